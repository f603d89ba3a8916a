"""The run doctor (nanoalign.doctor): each failure signature fires on a constructed failing run and
stays silent on a healthy one; it reads finished logs (the pipeline calls it after each stage);
inside the loop a NaN loss stops training with the last good checkpoint kept."""

import json
import math
import types

import pytest
import torch

from nanoalign import doctor
from nanoalign.record import HealthError
from nanoalign.doctor import diagnose


def names(rows):
    return {name for name, _ in diagnose(rows)}


def ppo_rows(n, score, gold, kl=5.0, entropy=0.5, end_rate=1.0):
    return [{"iter": i + 1, "score": score(i), "gold": gold(i), "kl": kl, "entropy": entropy,
             "end_rate": end_rate, "loss": 0.1} for i in range(n)]


def test_each_signature_fires_on_its_failing_case():
    assert names([{"step": 1, "loss": float("nan")}]) == {"non-finite loss"}
    assert names([{"step": 1, "loss": float("inf")}]) == {"non-finite loss"}
    assert names([{"iter": 1, "pg_loss": 0.1, "vf_loss": float("nan")}]) == {"non-finite loss"}
    assert "negative KL" in names(ppo_rows(1, lambda i: 0.0, lambda i: 0.0, kl=-3.0))
    assert "exploding KL" in names(ppo_rows(1, lambda i: 0.0, lambda i: 0.0, kl=120.0))
    assert "entropy collapse" in names(ppo_rows(1, lambda i: 0.0, lambda i: 0.0, entropy=0.01))
    rows = ppo_rows(6, lambda i: 0.0, lambda i: 0.0)
    for r in rows[3:]:
        r["end_rate"] = 0.0
    assert "no end token" in names(rows)
    rising_proxy_falling_gold = ppo_rows(20, lambda i: 0.1 * i, lambda i: 1.0 - 0.05 * i)
    assert "over-optimisation" in names(rising_proxy_falling_gold)
    # the shape of DPO at beta 0.03 in the tiny sweep:
    # chosen -21.4 -> -29.9, rejected -23.2 -> -37.8
    dpo = [{"step": i, "loss": 0.5, "logps/chosen": -21.0 - i, "logps/rejected": -23.0 - 1.5 * i}
           for i in range(12)]
    assert "DPO log-probs collapsing" in names(dpo)
    assert "no trainable tokens" in names([{"step": 1, "loss": 0.0, "tokens_per_s": 0.0}])


def test_healthy_runs_are_silent():
    healthy_ppo = ppo_rows(40, lambda i: 0.05 * i, lambda i: 0.5 + 0.01 * i, kl=8.0)
    assert all(not names(healthy_ppo[:k]) for k in range(1, 41))
    # the tiny run's DPO (beta 0.1): chosen -21.4 -> -22.6, rejected -23.2 -> -27.9
    dpo = [{"step": i, "loss": 0.6, "logps/chosen": -21.4 - 0.02 * i,
            "logps/rejected": -23.2 - 0.1 * i} for i in range(50)]
    assert not names(dpo)


def test_real_micro_runs_are_silent(micro_run):
    for stage in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo", "rlvr"):
        assert doctor.examine(str(micro_run / stage / "metrics.jsonl")) == [], stage


def test_the_offline_doctor_names_each_signature_once_with_its_step(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = ppo_rows(3, lambda i: 0.0, lambda i: 0.0, kl=120.0)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert doctor.main([str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("exploding KL") == 1 and "step 1" in err and "04-ppo.md" in err


def test_a_nan_loss_stops_pretraining_and_keeps_the_last_good_checkpoint(micro_run, tmp_path,
                                                                         monkeypatch):
    from nanoalign import record, train_pretrain
    calls, real = [0], torch.nn.functional.cross_entropy

    def poisoned(*args, **kwargs):  # training steps 1-4 are fine, then the loss turns NaN
        calls[0] += torch.is_grad_enabled()  # validation runs under no_grad
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls[0] > 4 else loss

    monkeypatch.setattr(train_pretrain, "F", types.SimpleNamespace(cross_entropy=poisoned))
    world = micro_run / "world"
    args = ["--data", str(world / "pretrain.txt"), "--val_data", "", "--tokenizer",
            str(world / "tok512.tiktoken"), "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
            "--max_steps", "8", "--batch_size", "4", "--eval_interval", "2", "--eval_batches", "1",
            "--out_dir", str(tmp_path)]
    with pytest.raises(HealthError, match="non-finite loss"):
        train_pretrain.main(args)
    ckpt = record.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 4  # saved at step 4; step 5's NaN row stopped the run before any save
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert math.isnan(record.read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"])


def test_the_log_stops_on_any_non_finite_loss_ppo_s_included(tmp_path):
    from dataclasses import dataclass

    from nanoalign.record import MetricsLog

    @dataclass
    class Config:
        lr: float = 1e-3

    log = MetricsLog(str(tmp_path), Config())
    log.log(iter=1, pg_loss=0.1, vf_loss=0.2)
    with pytest.raises(HealthError, match="non-finite loss"):
        log.log(iter=2, pg_loss=0.1, vf_loss=float("nan"))
