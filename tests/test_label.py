"""The labelling tool, driven by scripted keys: invalid keys are asked again, every A/B decision lands in a preference
file that the reward model trains on, ties and skips are logged, and an interrupt loses nothing and resumes."""

import io
import json
import re

from nanoalign import common, label, train_rm
from nanoalign.data import load_prefs


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


def test_scripted_session_writes_preferences_and_resumes_after_an_interrupt(micro_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "prefs.jsonl"
    argv = ["--ckpt", str(micro_run / "sft" / "ckpt.pt"), "--prompts", str(micro_run / "world" / "prompts_rl.jsonl"),
            "--out", str(out), "--rater", "ada", "--max_new_tokens", "12", "--n", "6"]
    monkeypatch.setattr("sys.stdin", io.StringIO("x\na\nb\nt\ns\n"))  # then end of input: quit
    assert label.main(argv) == 2
    first = capsys.readouterr().out
    pairs = shown(first)
    assert "'x' is not one of" in first and len(pairs) == 5  # 4 decided, the 5th shown when input ended
    prefs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in prefs] == [pairs[0], pairs[1][::-1]]  # a = A wins, b = B wins
    assert all(p["rater"] == "ada" and p["chosen_model"].endswith("ckpt.pt") for p in prefs)
    log = [json.loads(line) for line in open(f"{out}.log.jsonl")]
    assert [r["choice"] for r in log] == ["A", "B", "tie", "skip"]

    monkeypatch.setattr("sys.stdin", Interrupting("b\n"))  # one decision, then Ctrl-C
    assert label.main(argv) == 1
    second = capsys.readouterr().out
    assert shown(second)[0] == pairs[4]  # resumed with the first undecided prompt, same answers and order
    log = [json.loads(line) for line in open(f"{out}.log.jsonl")]
    assert len({r["prompt_index"] for r in log}) == len(log) == 5  # no prompt asked twice
    assert len(load_prefs(str(out))) == 3  # the file is a preference data set as it stands

    train_rm.main(["--init", str(micro_run / "sft" / "ckpt.pt"), "--data", str(out), "--val_data", "",
                   "--norm_data", "", "--batch_size", "2", "--epochs", "1", "--out_dir", str(tmp_path / "rm")])
    assert common.load_checkpoint(str(tmp_path / "rm" / "ckpt.pt"), stages=["rm"])
