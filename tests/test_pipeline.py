"""The one-command pipeline on the micro preset: every checkpoint, the report with every documented
key, skipping finished stages, and re-running a stage whose config changed."""

import json
import math
import shutil

import pytest

from nanoalign import pipeline

STAGE_KEYS = {"gold_score", "rm_score", "kl_to_sft", "win_rate_vs_sft", "end_rate", "mean_length",
              "distinct_2", "wall_seconds"}


def test_micro_pipeline_writes_every_checkpoint_and_a_complete_report(micro_run):
    for stage in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo"):
        assert (micro_run / stage / "ckpt.pt").exists(), stage
        assert (micro_run / stage / "metrics.jsonl").exists(), stage
    report = json.loads((micro_run / "report.json").read_text())
    assert {"preset", "machine", "total_seconds", "stages"} <= set(report)
    assert report["preset"] == "micro" and isinstance(report["total_seconds"], float)
    for name in ("base", "sft", "ppo", "dpo", "grpo"):
        stage = report["stages"][name]
        assert STAGE_KEYS <= set(stage), name
        assert all(isinstance(stage[k], float) for k in STAGE_KEYS), name
    assert report["stages"]["sft"]["kl_to_sft"] == 0.0
    # computed from two SFT sample sets
    assert 0.0 <= report["stages"]["sft"]["win_rate_vs_sft"] <= 1.0
    assert {"val_accuracy", "gold_agreement", "wall_seconds"} <= set(report["stages"]["rm"])
    assert (micro_run / "report.md").exists()
    assert (micro_run / "training_curves.png").exists()


def test_pipeline_skips_finished_stages_and_reruns_a_stage_whose_config_or_world_changed(
        tmp_path, capsys):
    argv = ["--preset", "micro", "--out", str(tmp_path / "run"), "--stages", "pretrain,sft"]
    pipeline.main(argv)
    capsys.readouterr()
    pipeline.main(argv)
    out = capsys.readouterr().out
    assert "pretrain: done" in out and "sft: done" in out
    done = json.loads((tmp_path / "run" / "sft" / "done.json").read_text())
    done["config"] = "stale"  # as if the SFT config had changed since it ran
    (tmp_path / "run" / "sft" / "done.json").write_text(json.dumps(done))
    pipeline.main(argv)
    out = capsys.readouterr().out
    assert "pretrain: done" in out and "sft: config, parent checkpoint or world changed" in out
    # both trained before world.py was edited: the data they saw are gone
    for stage in ("pretrain", "sft"):
        done = json.loads((tmp_path / "run" / stage / "done.json").read_text())
        assert done["world"] == pipeline.world_id(str(tmp_path / "run" / "world"))
        done["world"] = "0:0.05:an-older-world.py"
        (tmp_path / "run" / stage / "done.json").write_text(json.dumps(done))
    pipeline.main(argv)
    out = capsys.readouterr().out
    assert "pretrain: config, parent checkpoint or world changed" in out
    assert "sft: config, parent" in out


def test_a_stage_stopped_by_ctrl_c_is_not_done_and_the_pipeline_stops_then_resumes_it(
        tmp_path, capsys, monkeypatch):
    """Ctrl-C saves the stage's checkpoint, but that is a point to resume from: no done.json, no
    next stage trained on a half-trained parent, and the same command resumes it."""
    import os
    import signal

    from nanoalign import common
    argv = ["--preset", "micro", "--out", str(tmp_path / "run"), "--stages", "pretrain,sft"]
    calls, real = [], common.StopSignal.should_stop

    def ctrl_c_at_step_2(self):  # a real SIGINT, caught by the stage's own handler
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        monkeypatch.setattr(common.StopSignal, "should_stop", ctrl_c_at_step_2)
        with pytest.raises(SystemExit, match="pretrain stopped at a signal"):
            pipeline.main(argv)
        run = tmp_path / "run"
        assert (run / "pretrain" / "ckpt.pt").exists()
        assert not (run / "pretrain" / "done.json").exists()
        assert not (run / "sft").exists()  # never started from the half-trained model
        monkeypatch.setattr(common.StopSignal, "should_stop", real)
        capsys.readouterr()
        pipeline.main(argv)
        assert "pretrain: found an unfinished run, resuming it" in capsys.readouterr().out
        assert all((run / stage / "done.json").exists() for stage in ("pretrain", "sft"))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_rlvr_stage_reports_held_out_accuracy_of_sft_and_rlvr(micro_run):
    report = json.loads((micro_run / "report.json").read_text())
    for name in ("sft", "rlvr"):
        r = report["stages"][name]
        assert 0.0 <= r["verifiable_accuracy"] <= 1.0, name
        assert r["verifiable_accuracy_ci"] >= 0.0, name
        n_problems = len((micro_run / "world" / "verifiable_val.jsonl").read_text().splitlines())
        assert r["verifiable_n"] == min(report["sampling"]["n_prompts"], n_problems)
    assert "Exact-answer task" in (micro_run / "report.md").read_text()


def test_sweep_writes_the_frontier_with_best_of_n_and_the_overoptimisation_run(micro_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    sweep = pipeline.main(["--preset", "micro", "--out", str(run), "--sweep", "--ppo_betas", "0.2",
                           "--dpo_betas", "0.3", "--best_of", "1,2,4", "--overopt_iters", "3"])
    methods = [(p["method"], p["label"]) for p in sweep["points"]]
    assert {("ppo", "0.05"), ("ppo", "0.2"), ("dpo", "0.3")} <= set(methods)
    bon = {p["n"]: p for p in sweep["points"] if p["method"] == "bon"}
    for n, p in bon.items():  # KL(best-of-n || SFT) = log n - (n - 1) / n
        assert p["kl_to_sft"] == pytest.approx(math.log(n) - (n - 1) / n)
    # one nested pool of samples: the RM's favourite of more samples scores at least as high
    assert bon[1]["rm_score"] <= bon[2]["rm_score"] <= bon[4]["rm_score"]
    assert [r["iter"] for r in sweep["overoptimisation"]] == [1, 2, 3]
    assert all(r["kl_coef"] == 0.0 for r in sweep["overoptimisation"])
    for name in ("sweep.json", "frontier.png", "overoptimisation.png"):
        assert (run / "sweep" / name).exists(), name


def test_seeds_report_mean_and_ci_over_seeds(micro_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(micro_run, run)
    summary = pipeline.main(["--preset", "micro", "--out", str(run), "--seeds", "2",
                             "--stages", "pretrain,sft,rm,dpo"])
    assert summary["seeds"] == [0, 1] and (tmp_path / "run_seed1" / "dpo" / "ckpt.pt").exists()
    gold = summary["stages"]["dpo"]["gold_score"]
    a, b = gold["values"]
    assert gold["mean"] == pytest.approx((a + b) / 2)
    assert gold["ci"] == pytest.approx(12.706 * abs(a - b) / 2)  # t(0.975, 1 dof) * sd / sqrt(2)
    assert "±" in (run / "seeds.md").read_text()
