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


def test_a_simulated_class_agrees_with_gold_as_the_annotator_should(tmp_path):
    """label --simulate: every rater judges every pair once, in an A/B order of their own, and the
    share of decisions that pick the gold judge's better answer is the Bradley-Terry annotator's
    expected mean sigmoid(|margin| / TAU), within sampling error."""
    from nanoalign.world import TAU, sigmoid
    prefs, log = tmp_path / "prefs.jsonl", tmp_path / "class.log.jsonl"
    margins = [0.05 * (i % 12) for i in range(400)]  # 0 to 0.55: flip rates from 1/2 to ~1/10
    with open(prefs, "w") as f:
        for i, m in enumerate(margins):  # the file's chosen is the gold-worse answer half the time
            gold = [1.0 + m, 1.0] if i % 2 else [1.0, 1.0 + m]
            f.write(json.dumps({"prompt": f"q{i}", "chosen": f"x{i}", "rejected": f"y{i}",
                                "gold_chosen": gold[0], "gold_rejected": gold[1]}) + "\n")
    n = label.main(["--simulate", "3", "--pairs", str(prefs), "--n", "400", "--out", str(log)])
    decisions = [json.loads(line) for line in open(log)]
    assert n == len(decisions) == 1200
    assert sorted({d["rater"] for d in decisions}) == ["sim1", "sim2", "sim3"]
    assert all(len({d["pair"] for d in decisions if d["rater"] == r}) == 400
               for r in ("sim1", "sim2", "sim3"))
    a_first = sum(d["A"] == "chosen" for d in decisions) / len(decisions)
    assert 0.45 < a_first < 0.55  # each rater's own random order
    # the answer picked, by its gold score (as shown: gold[0] is A's)
    picked = [0 if d["choice"] == "A" else 1 for d in decisions]
    gold_better = [d["gold"][p] > d["gold"][1 - p] for d, p in zip(decisions, picked)
                   if d["gold"][0] != d["gold"][1]]
    expected = sum(sigmoid(m / TAU) for m in margins if m > 0) / sum(m > 0 for m in margins)
    share = sum(gold_better) / len(gold_better)
    assert abs(share - expected) < 3 * (expected * (1 - expected) / len(gold_better)) ** 0.5
    # the same seed gives the same log; pairs without gold are refused with the reason
    again = tmp_path / "again.jsonl"
    label.main(["--simulate", "3", "--pairs", str(prefs), "--n", "400", "--out", str(again)])
    assert [d["choice"] for d in map(json.loads, open(again))] == [d["choice"] for d in decisions]
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match="gold_chosen"):
        label.main(["--simulate", "2", "--pairs", str(bare), "--out", str(tmp_path / "x")])
