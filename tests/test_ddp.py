"""DDP: one torchrun launch (2 ranks, gloo, CPU) runs every stage; the ranks must agree, and for the stages with a
fixed global batch rank 0's weights must equal one process trained on the same global batch (in float64: in float32,
Adam turns the rounding noise of exactly-zero gradients, such as attention key biases', into visible updates). PPO's update is checked
on a fixed rollout, with a negative control: per-rank advantage whitening must NOT match one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_cases import SAME_GLOBAL_BATCH, STAGES, fixed_rollout_update  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ddp_run(micro_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "ddp_driver.py"), str(micro_run), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.mark.slow
def test_every_stage_keeps_identical_weights_and_beta_on_both_ranks(ddp_run):
    r0 = json.loads((ddp_run / "rank0.json").read_text())
    r1 = json.loads((ddp_run / "rank1.json").read_text())
    for name in STAGES:
        assert r0[name] == r1[name], f"{name}: the ranks' weights differ"
    assert r0["ppo_kl_coef"] == r1["ppo_kl_coef"] and r0["ppo_kl_coef"] != 0.05  # adapted, identically


@pytest.mark.slow
@pytest.mark.parametrize("name", SAME_GLOBAL_BATCH)
def test_two_ranks_equal_one_process_on_the_same_global_batch(ddp_run, micro_run, name):
    module, argv = STAGES[name]
    single = module.main(argv(str(micro_run), world_size=1) + ["--out_dir", str(ddp_run / "single" / name)])
    ddp = torch.load(ddp_run / "ddp" / name / "ckpt.pt", weights_only=False)["model"]
    init = torch.load(os.path.join(micro_run, "sft" if name in ("rm", "dpo") else "pretrain", "ckpt.pt"),
                      weights_only=False)["model"]
    moved = 0.0
    for k, v in single.state_dict().items():
        assert torch.allclose(v, ddp[k], atol=1e-9, rtol=1e-7), f"{name}: {k} differs between 2 ranks and 1 process"
        if name != "pretrain" and k in init:
            moved = max(moved, (v - init[k]).abs().max().item())
    assert name == "pretrain" or moved > 1e-2  # the weights really moved, far beyond the tolerance


@pytest.mark.slow
def test_ppo_update_on_a_fixed_rollout_matches_one_process_only_with_global_whitening(ddp_run, micro_run):
    single = fixed_rollout_update(str(micro_run), "global").state_dict()
    ddp = torch.load(ddp_run / "ppo_fixed_global_ddp.pt", weights_only=False)
    local = torch.load(ddp_run / "ppo_fixed_local_ddp.pt", weights_only=False)
    assert all(torch.allclose(single[k], ddp[k], atol=1e-9) for k in single)
    assert not all(torch.allclose(single[k], local[k], atol=1e-6) for k in single)  # the negative control
