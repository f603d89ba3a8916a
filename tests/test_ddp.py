"""DDP: one torchrun launch (2 ranks, gloo, CPU) runs every stage; the ranks must agree, and for the
stages with a fixed global batch rank 0's weights must equal one process trained on the same global
batch (in float64: in float32, Adam turns the rounding noise of exactly-zero gradients, such as
attention key biases', into visible updates). PPO's update is checked on a fixed rollout, with a
negative control: per-rank advantage whitening must NOT match one process."""

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
    # adapted, identically
    assert r0["ppo_kl_coef"] == r1["ppo_kl_coef"] and r0["ppo_kl_coef"] != 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", SAME_GLOBAL_BATCH)
def test_two_ranks_equal_one_process_on_the_same_global_batch(ddp_run, micro_run, name):
    module, argv = STAGES[name]
    single = module.main(argv(str(micro_run), world_size=1)
                         + ["--out_dir", str(ddp_run / "single" / name), "--device", "cpu"])
    ddp = torch.load(ddp_run / "ddp" / name / "ckpt.pt", weights_only=True)["model"]
    init_stage = "sft" if name in ("rm", "dpo") else "pretrain"
    init = torch.load(os.path.join(micro_run, init_stage, "ckpt.pt"), weights_only=True)["model"]
    moved = 0.0
    for k, v in single.state_dict().items():
        msg = f"{name}: {k} differs between 2 ranks and 1 process"
        assert torch.allclose(v, ddp[k], atol=1e-9, rtol=1e-7), msg
        if name != "pretrain" and k in init:
            moved = max(moved, (v - init[k]).abs().max().item())
    # the weights really moved, far beyond the tolerance
    assert name == "pretrain" or moved > 1e-2


@pytest.mark.slow
def test_ppo_update_on_a_fixed_rollout_matches_one_process_only_with_global_whitening(ddp_run,
                                                                                      micro_run):
    """Gradients of the first minibatch (before clipping and any optimizer step, which could hide a
    uniform scale) and weights after two Adam steps: 2 ranks equal 1 process; per-rank whitening
    (the negative control) does not."""
    model, single_grads = fixed_rollout_update(str(micro_run), "global")
    single = model.state_dict()
    ddp = torch.load(ddp_run / "ppo_fixed_global_ddp.pt", weights_only=True)
    local = torch.load(ddp_run / "ppo_fixed_local_ddp.pt", weights_only=True)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12)
               for a, b in zip(single_grads, ddp["grads"]))
    assert all(torch.allclose(single[k], ddp["model"][k], atol=1e-9) for k in single)
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-8)
                   for a, b in zip(single_grads, local["grads"]))


# --------------------------------------------------------------------------------------------------
# Fast single-process checks of the same normalisation algebra. Two ranks that hold identical data
# must step exactly as one process: DDP averages their (identical) gradients, so each rank's loss
# must be scaled as if it held the whole batch. Faked here with a Dist of world 2 and an all-reduce
# that doubles (the other rank's share), and compared on gradients (or SGD steps), which, unlike
# Adam's, keep a uniform scale error visible.

class GradRecorder:
    """An 'optimizer' that records the gradients it is asked to apply."""

    def __init__(self, params):
        self.params = list(params)
        self.param_groups, self.grads = [{"params": self.params, "lr": 0.0}], []

    def step(self):
        self.grads.append([p.grad.detach().clone() for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


@pytest.fixture
def two_identical_ranks(monkeypatch):
    from nanoalign import common, rl
    double = lambda x: 2 * x
    monkeypatch.setattr(common, "all_reduce_sum", double)
    monkeypatch.setattr(rl, "all_reduce_sum", double)
    return common.Dist(rank=0, world=2)


def rl_batch(with_values: bool):
    import copy
    from nanoalign.model import GPT, GPTConfig
    from nanoalign.rl import rollout
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=1, n_head=2, n_embd=16))
    policy.double()
    ref = copy.deepcopy(policy).requires_grad_(False)
    if with_values:
        policy.add_scalar_head("reward").double()
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    ro = rollout(policy, ref, prompts, end_id=39, pad_id=0, max_new_tokens=6, temperature=1.0,
                 generator=torch.Generator().manual_seed(0), with_values=with_values)
    return policy, ro


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_two_identical_ranks_give_one_process_gradients(stage, request):
    """The minibatch token count is global and divided by the world size: drop the division and
    every gradient halves on 2 ranks (Adam and clipping hide it; the raw gradients do not)."""
    from nanoalign import common
    from nanoalign.train_grpo import GRPOConfig, grpo_update
    from nanoalign.train_ppo import PPOConfig, advantages_and_returns, ppo_update
    grads = {}
    for world in (1, 2):
        d = request.getfixturevalue("two_identical_ranks") if world == 2 else common.Dist()
        policy, ro = rl_batch(with_values=stage == "ppo")
        recorder = GradRecorder(policy.parameters())
        if stage == "ppo":
            cfg = PPOConfig(batch_size=4, minibatches=1, ppo_epochs=1, iterations=1, grad_clip=1e9)
            scores = torch.tensor([1.0, -1.0, 0.5, 0.0]).double()
            adv, ret, _ = advantages_and_returns(ro, scores, 0.05, cfg)
            ppo_update(policy, recorder, ro, adv, ret, cfg, 0, d)
        else:
            cfg = GRPOConfig(prompts_per_iter=2, group_size=2, minibatches=1, ppo_epochs=1,
                             iterations=1, grad_clip=1e9)
            keep = torch.ones(4, dtype=torch.bool)
            advantages = torch.tensor([1.0, -1.0, 0.5, -0.5]).double()
            grpo_update(policy, recorder, ro, advantages, keep, cfg, 0, d)
        grads[world] = recorder.grads[0]
    assert any(g.abs().max() > 1e-3 for g in grads[1])
    for one, two in zip(grads[1], grads[2]):
        assert torch.allclose(one, two, rtol=1e-10, atol=1e-12)


def sft_run(micro_run, tmp_path, monkeypatch, name, batch_size, grad_accum, data):
    from nanoalign import common, train_sft
    sgd = lambda model, lr, wd: torch.optim.SGD(model.parameters(), lr)
    monkeypatch.setattr(common, "make_optimizer", sgd)
    model = train_sft.main(["--init", str(micro_run / "pretrain" / "ckpt.pt"), "--data", str(data),
                            "--val_data", "", "--max_steps", "2", "--warmup", "0", "--lr", "0.5",
                            "--grad_clip", "0", "--batch_size", str(batch_size),
                            "--grad_accum", str(grad_accum), "--eval_interval", "100",
                            "--dtype", "float64", "--out_dir", str(tmp_path / name),
                            "--device", "cpu"])
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sft_gradient_accumulation_equals_one_big_batch(micro_run, tmp_path, monkeypatch):
    """Global token normalisation: 2 micro-batches of 4 step exactly as one batch of 8 (plain SGD,
    so a per-micro-batch mean would show as a different step)."""
    data = micro_run / "world" / "sft_train.jsonl"
    one = sft_run(micro_run, tmp_path, monkeypatch, "one", 8, 1, data)
    accumulated = sft_run(micro_run, tmp_path, monkeypatch, "accum", 4, 2, data)
    for k in one:
        assert torch.allclose(one[k], accumulated[k], rtol=1e-9, atol=1e-12), k


def test_sft_two_identical_ranks_step_exactly_as_one_process(micro_run, tmp_path, monkeypatch):
    """Every example the same, so both ranks' shares are identical and DDP's average is this rank's
    gradient: with the x world factor it equals one process on the same global batch."""
    from nanoalign import common
    line = (micro_run / "world" / "sft_train.jsonl").read_text().splitlines()[0]
    data = tmp_path / "same.jsonl"
    data.write_text((line + "\n") * 16)
    one = sft_run(micro_run, tmp_path, monkeypatch, "one", 8, 1, data)
    monkeypatch.setattr(common, "init_dist", lambda device: common.Dist(rank=0, world=2))
    monkeypatch.setattr(common, "all_reduce_sum", lambda x: 2 * x)
    two = sft_run(micro_run, tmp_path, monkeypatch, "two", 4, 1, data)
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-9, atol=1e-12), k
