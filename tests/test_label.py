"""The labelling tool, driven by scripted keys: invalid keys are asked again, every A/B decision
lands in a preference file that the reward model trains on, ties and skips are logged, and an
interrupt loses nothing and resumes. Its log gives human win rates (evaluate --labels), counted by
model, never by screen position."""

import io
import json
import re

import pytest

from nanoalign import evaluate, label, record, train_rm
from nanoalign.data import DataError, load_prefs


class Interrupting(io.StringIO):
    """Keys, then Ctrl-C."""

    def readline(self, *args):
        line = super().readline(*args)
        if not line:
            raise KeyboardInterrupt
        return line


def shown(text):
    """[(A, B)] of every pair printed."""
    return re.findall(r"\n  A: (.*)\n  B: (.*)", text)


def test_scripted_session_writes_preferences_and_resumes_after_an_interrupt(micro_run, tmp_path,
                                                                           monkeypatch, capsys):
    out = tmp_path / "prefs.jsonl"
    argv = ["--ckpt", str(micro_run / "sft" / "ckpt.pt"),
            "--prompts", str(micro_run / "world" / "prompts_rl.jsonl"),
            "--out", str(out), "--rater", "ada", "--max_new_tokens", "12", "--n", "6"]
    monkeypatch.setattr("sys.stdin", io.StringIO("x\na\nb\nt\ns\n"))  # then end of input: quit
    assert label.main(argv) == 2
    first = capsys.readouterr().out
    pairs = shown(first)
    # 4 decided, the 5th shown when input ended
    assert "'x' is not one of" in first and len(pairs) == 5
    prefs = [json.loads(line) for line in out.read_text().splitlines()]
    # a = A wins, b = B wins
    assert [(p["chosen"], p["rejected"]) for p in prefs] == [pairs[0], pairs[1][::-1]]
    assert all(p["rater"] == "ada" and p["chosen_model"].endswith("ckpt.pt") for p in prefs)
    log = [json.loads(line) for line in open(f"{out}.log.jsonl")]
    assert [r["choice"] for r in log] == ["A", "B", "tie", "skip"]

    monkeypatch.setattr("sys.stdin", Interrupting("b\n"))  # one decision, then Ctrl-C
    assert label.main(argv) == 1
    second = capsys.readouterr().out
    # resumed with the first undecided prompt, same answers and order
    assert shown(second)[0] == pairs[4]
    log = [json.loads(line) for line in open(f"{out}.log.jsonl")]
    assert len({r["prompt_index"] for r in log}) == len(log) == 5  # no prompt asked twice
    assert len(load_prefs(str(out))) == 3  # the file is a preference data set as it stands

    train_rm.main(["--init", str(micro_run / "sft" / "ckpt.pt"), "--data", str(out),
                   "--val_data", "", "--norm_data", "", "--batch_size", "2", "--epochs", "1",
                   "--out_dir", str(tmp_path / "rm")])
    assert record.load_checkpoint(str(tmp_path / "rm" / "ckpt.pt"), stages=["rm"])


def test_human_win_rates_count_models_not_positions_with_ties_half_and_skips_out(tmp_path):
    ppo, sft = "out/ppo.pt", "out/sft.pt"
    rows = [("A", ppo, sft, [ppo, sft]), ("A", sft, ppo, [ppo, sft]), ("B", sft, ppo, [ppo, sft]),
            ("tie", ppo, sft, [ppo, sft]), ("skip", sft, ppo, [ppo, sft]),
            ("identical", sft, ppo, [ppo, sft]),
            ("A", sft, sft, [sft, sft]),  # two samples of one model: no contest
            # a later session with the roles swapped: still PPO's win, in the same game
            ("B", sft, ppo, [sft, ppo])]
    log = tmp_path / "prefs.jsonl.log.jsonl"
    decisions = [{"prompt_index": i, "choice": c, "A": a, "B": b, "models": m}
                 for i, (c, a, b, m) in enumerate(rows)]
    log.write_text("".join(json.dumps(d) + "\n" for d in decisions))
    out = evaluate.main(["--labels", str(tmp_path / "prefs.jsonl")])["human_labels"]
    r = out[f"{ppo} vs {sft}"]
    assert r["model"] == ppo and r["n"] == 6
    assert abs(r["win_rate"] - (1 + 0 + 1 + 0.5 + 0.5 + 1) / 6) < 1e-12
    assert len(out) == 1 and 0 < r["win_rate_ci"] < 1
    log.write_text(json.dumps({"prompt_index": 0, "A": ppo}) + "\n")
    with pytest.raises(DataError, match=r"prefs.jsonl.log.jsonl:1: expected a labelling decision"):
        evaluate.human_win_rates(str(log))


def test_a_compare_session_logs_both_models_and_evaluate_reads_its_win_rate(micro_run, tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "prefs.jsonl"
    ppo, sft = str(micro_run / "ppo" / "ckpt.pt"), str(micro_run / "sft" / "ckpt.pt")
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nb\ns\nt\n"))
    label.main(["--ckpt", ppo, "--compare", sft,
                "--prompts", str(micro_run / "world" / "prompts_rl.jsonl"),
                "--out", str(out), "--max_new_tokens", "12", "--n", "4"])
    log = [json.loads(line) for line in open(f"{out}.log.jsonl")]
    assert all(r["models"] == [ppo, sft] and {r["A"], r["B"]} == {ppo, sft} for r in log)
    wins = [{"A": r["A"], "B": r["B"]}.get(r["choice"]) for r in log if r["choice"] != "skip"]
    r = evaluate.human_win_rates(str(out))[f"{ppo} vs {sft}"]
    expected = sum(1.0 if w == ppo else 0.5 if w is None else 0.0 for w in wins) / 3
    assert r["n"] == 3 and abs(r["win_rate"] - expected) < 1e-12
