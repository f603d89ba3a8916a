"""The one-command pipeline on the micro preset: every checkpoint, the report with every documented key, skipping
finished stages, and re-running a stage whose config changed."""

import json

from nanoalign import pipeline

STAGE_KEYS = {"gold_score", "rm_score", "kl_to_sft", "win_rate_vs_sft", "end_rate", "mean_length", "distinct_2",
              "wall_seconds"}


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
    assert 0.0 <= report["stages"]["sft"]["win_rate_vs_sft"] <= 1.0  # computed from two SFT sample sets
    assert {"val_accuracy", "gold_agreement", "wall_seconds"} <= set(report["stages"]["rm"])
    assert (micro_run / "report.md").exists() and (micro_run / "training_curves.png").exists()


def test_pipeline_skips_finished_stages_and_reruns_a_stage_whose_config_changed(tmp_path, capsys):
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
    assert "pretrain: done" in out and "sft: config or parent checkpoint changed" in out
