"""The GPU path, checked where a CPU can show it: every collective valid under NCCL, no unused
head under DDP, dropout really off, and the invariants of fp32 kept in bf16 (CPU autocast serves).

Tests marked `cuda` run on the device that NANOALIGN_TEST_DEVICE names (default: the CPU), so the
GPU check (`python -m nanoalign.gpu_check`) runs exactly these on CUDA, and CI runs them on the CPU
so that they cannot rot."""

import ast
import copy
import importlib
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from nanoalign import common, record
from nanoalign.generate import entropy_from_logits, generate, response_logprobs
from nanoalign.model import GPT, GPTConfig, set_dropout
from nanoalign.rl import kl_estimates, rollout
from nanoalign.train_dpo import dpo_loss, policy_and_reference_logps
from nanoalign.train_grpo import GRPOConfig, grpo_update
from nanoalign.train_ppo import PPOConfig, advantages_and_returns, ppo_update

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("NANOALIGN_TEST_DEVICE", "cpu")
V, PAD, END = 97, 0, 96


def model(seed=0, device="cpu", **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=64)
    return GPT(GPTConfig(**{**cfg, **kw})).to(device)


def sharpen(m, scale=4.0):
    """Logits as sharp as a trained model's: bf16 rounding matters most where few tokens carry
    the mass."""
    with torch.no_grad():
        m.lm_head.weight.mul_(scale)
    return m


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g).tolist()
    return [torch.randint(1, END, (k,), generator=g).tolist() for k in lengths]


# ----------------------------------------------------------------------------------- collectives

def test_no_file_but_common_calls_torch_distributed():
    """Every collective goes through common.py, where each is valid under NCCL."""
    offenders = []
    for path in sorted((ROOT / "nanoalign").glob("*.py")):
        if path.name == "common.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute):
                names = [ast.unparse(node)]
            else:
                continue
            if any(n.startswith("torch.distributed") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"torch.distributed used outside common.py: {offenders}"


def test_cuda_process_group_has_a_cpu_backend_for_cpu_tensors(monkeypatch):
    """NCCL alone rejects CPU tensors (stop flags, RNG states): on CUDA the group must register
    gloo for the CPU beside NCCL."""
    seen = {}
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(common.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(common.dist, "init_process_group", lambda backend: seen.update(b=backend))
    d = common.init_dist("cuda")
    assert d.ddp and d.device == "cuda:0"
    assert seen["b"] == "cpu:gloo,cuda:nccl"
    assert common.process_group_backend("cpu") == "gloo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_torchrun(monkeypatch):
    """The environment torchrun gives one rank: the stage must start a process group and DDP."""
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield
    common.cleanup_dist()


@pytest.mark.parametrize("stage", ["train_sft", "train_dpo"])
def test_sft_and_dpo_from_a_ppo_policy_run_under_ddp(micro_run, tmp_path, one_rank_torchrun, stage):
    """A PPO checkpoint carries a value head that SFT and DPO never read: if the model kept it,
    DDP would stop at step 2 ("Expected to have finished reduction in the prior iteration")."""
    module = importlib.import_module(f"nanoalign.{stage}")
    data = "sft_train.jsonl" if stage == "train_sft" else "prefs_train.jsonl"
    argv = ["--init", str(micro_run / "ppo" / "ckpt.pt"), "--data", str(micro_run / "world" / data),
            "--val_data", "", "--batch_size", "4", "--eval_interval", "100",
            "--out_dir", str(tmp_path / stage)]
    argv += ["--max_steps", "3"] if stage == "train_sft" else ["--epochs", "0.02"]
    trained = module.main(argv)
    assert trained.scalar_head is None
    assert record.read_metrics(tmp_path / stage / "metrics.jsonl")[-1]["step"] >= 2


# ----------------------------------------------------------------------------------- dropout

def test_set_dropout_turns_off_attention_dropout_too():
    m = model(dropout=0.1).train()
    x = torch.randint(1, V, (2, 16))
    assert not torch.equal(m(x), m(x))  # dropout on: two forwards differ
    set_dropout(m, 0.0)
    assert torch.equal(m(x), m(x))


# ----------------------------------------------------------------------------------- precision

def test_float16_is_refused_with_a_clear_message(capsys):
    from nanoalign import train_sft
    with pytest.raises(SystemExit):
        train_sft.main(["--dtype", "float16"])
    assert "gradient scaler" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bfloat16"):
        common.autocast("cpu", "float16")


@pytest.mark.cuda
def test_scalar_head_reads_fp32_hidden_states_under_bf16():
    """A bf16 head would round each reward or value to 8 bits of mantissa."""
    m = model(device=DEVICE).add_scalar_head("reward").eval()
    x = torch.randint(1, V, (3, 20), device=DEVICE)
    hidden = []
    m.transformer.ln_f.register_forward_hook(lambda module, inputs, out: hidden.append(out))
    with torch.no_grad(), common.autocast(DEVICE, "bfloat16"):
        scalar = m(x, output="scalar")
    head = m.scalar_head
    expected = hidden[0].float() @ head.weight[0].float() + head.bias.float()
    assert scalar.dtype == torch.float32
    assert torch.allclose(scalar, expected, atol=1e-5)


def test_temperature_divides_upcast_logits_and_entropy_is_at_the_temperature():
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, V) * 8).bfloat16()
    tokens = torch.randint(0, V, (2, 5))
    logp = torch.log_softmax(logits.float()[:, :-1] / 0.7, -1)
    assert torch.equal(response_logprobs(logits, tokens, 1, 0.7),
                       logp.gather(2, tokens[:, 1:, None]).squeeze(-1))
    p = torch.softmax(logits.float() / 0.7, -1)
    assert torch.allclose(entropy_from_logits(logits, 0.7), -(p * p.log()).sum(-1), atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ppo_first_minibatch_has_ratio_exactly_one_in_every_precision(dtype):
    policy = sharpen(model(device=DEVICE))
    ref = copy.deepcopy(policy).requires_grad_(False)
    policy.add_scalar_head("reward")  # a non-zero value head: old and new values must agree too
    cfg = PPOConfig(batch_size=8, minibatches=2, ppo_epochs=1, iterations=1, dtype=dtype, lr=1e-3)
    generator = torch.Generator(DEVICE).manual_seed(0)
    ro = rollout(policy, ref, prompts(8), END, PAD, 16, 1.0, generator, with_values=True,
                 dtype=dtype, minibatch=cfg.batch_size // cfg.minibatches)
    for k in kl_estimates(ro.logprobs, ro.ref_logprobs):
        assert (k[ro.response_mask] == 0).all()  # policy = reference at init: KL exactly 0
    assert ro.values.dtype == torch.float32
    adv, ret, _ = advantages_and_returns(ro, torch.linspace(-1, 1, 8, device=DEVICE), 0.05, cfg)
    optimizer = common.make_optimizer(policy, cfg.lr, 0.0)
    first = ppo_update(policy, optimizer, ro, adv, ret, cfg, 0, common.Dist(device=DEVICE))[0][0]
    assert first["ratio"].item() == 1.0 and first["approxkl"].item() == 0.0
    assert first["clipfrac"].item() == 0.0 and first["vf_clipfrac"].item() == 0.0


@pytest.mark.cuda
def test_grpo_first_minibatch_has_ratio_exactly_one_in_bf16():
    policy = sharpen(model(device=DEVICE))
    ref = copy.deepcopy(policy).requires_grad_(False)
    cfg = GRPOConfig(prompts_per_iter=4, group_size=2, minibatches=2, ppo_epochs=1, iterations=1,
                     dtype="bfloat16")
    groups = [p for p in prompts(4) for _ in range(2)]
    ro = rollout(policy, ref, groups, END, PAD, 16, 1.0, torch.Generator(DEVICE).manual_seed(0),
                 dtype="bfloat16", minibatch=4)
    adv = torch.tensor([1.0, -1.0] * 4, device=DEVICE)
    keep = torch.ones(8, dtype=torch.bool, device=DEVICE)
    optimizer = common.make_optimizer(policy, 1e-3, 0.0)
    first = grpo_update(policy, optimizer, ro, adv, keep, cfg, 0, common.Dist(device=DEVICE))[0][0]
    assert first["ratio"].item() == 1.0 and first["clipfrac"].item() == 0.0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dpo_loss_is_exactly_log2_at_init_in_every_precision(dtype):
    """The stage's own function: the reference on the same batch, under the same autocast."""
    policy = sharpen(model(device=DEVICE))
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    triples = zip(prompts(6, seed=1), prompts(6, seed=2), prompts(6, seed=3))
    pairs = [(p, c + [END], r + [END]) for p, c, r in triples]
    logps = policy_and_reference_logps(policy, ref, pairs, PAD, DEVICE, dtype)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*logps, beta=0.1)
    assert torch.equal(losses, -torch.nn.functional.logsigmoid(torch.zeros_like(losses)))  # log 2
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()


@pytest.mark.parametrize("stage", ["train_ppo", "train_grpo"])
def test_rl_stage_logs_ratio_exactly_one_at_its_first_update_in_bf16(micro_run, tmp_path, stage):
    """The stage itself, one iteration of one update: its rollout must recompute the old log-probs
    under the update's autocast and at its minibatch shape."""
    module = importlib.import_module(f"nanoalign.{stage}")
    sizes = ["--batch_size", "4"] if stage == "train_ppo" else ["--prompts_per_iter", "2",
                                                                "--group_size", "2"]
    module.main(["--init", str(micro_run / "sft" / "ckpt.pt"), "--reward_model",
                 str(micro_run / "rm" / "ckpt.pt"), "--prompts",
                 str(micro_run / "world" / "prompts_rl.jsonl"), "--iterations", "1",
                 "--minibatches", "1", "--ppo_epochs", "1", "--max_new_tokens", "12",
                 "--dtype", "bfloat16", "--log_gold", "false", "--out_dir", str(tmp_path)] + sizes)
    row = record.read_metrics(tmp_path / "metrics.jsonl")[0]
    assert row["ratio"] == 1.0 and row["clipfrac"] == 0.0
    assert stage == "train_grpo" or row["approxkl"] == 0.0


def test_dpo_stage_logs_loss_log2_at_its_first_step_in_bf16(micro_run, tmp_path):
    from nanoalign import record, train_dpo
    train_dpo.main(["--init", str(micro_run / "sft" / "ckpt.pt"), "--data",
                    str(micro_run / "world" / "prefs_train.jsonl"), "--val_data", "",
                    "--batch_size", "4", "--stop_at", "1", "--dtype", "bfloat16",
                    "--out_dir", str(tmp_path / "dpo")])
    first = record.read_metrics(tmp_path / "dpo" / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/margins"] == 0.0


# ----------------------------------------------------------------------------------- device vs CPU

@pytest.mark.cuda
def test_device_logits_match_the_cpu_and_the_kv_cache_matches_recomputation():
    cpu = model().eval()
    dev = copy.deepcopy(cpu).to(DEVICE)
    x = torch.randint(1, V, (4, 24))
    with torch.no_grad():
        reference = cpu(x)
        assert torch.allclose(dev(x.to(DEVICE)).cpu(), reference, atol=2e-3)  # TF32 on a GPU
        with common.autocast(DEVICE, "bfloat16"):
            assert torch.allclose(dev(x.to(DEVICE)).float().cpu(), reference, atol=5e-2)
    batch = prompts(5)
    cached = generate(dev, batch, 20, END, PAD, temperature=0)
    recomputed = generate(dev, batch, 20, END, PAD, temperature=0, use_cache=False)
    assert torch.equal(cached[0], recomputed[0]) and torch.equal(cached[1], recomputed[1])


# ----------------------------------------------------------------------------------- small hangs

def test_evaluate_refuses_temperature_zero(capsys):
    from nanoalign import evaluate
    with pytest.raises(SystemExit):
        evaluate.main(["--temperature", "0"])
    assert "temperature" in capsys.readouterr().err


def test_online_dpo_round_of_ties_only_is_skipped_not_divided_by_zero(micro_run, tmp_path,
                                                                      monkeypatch):
    """The round is skipped; with no offline pass nothing was trained, which stops with an error
    (no checkpoint identical to its parent)."""
    from nanoalign import record, train_dpo
    (tmp_path / "flatjudge.py").write_text("def flat(prompts, responses):\n"
                                           "    return [0.0 for _ in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="--online_rounds: each round was skipped"):
        train_dpo.main(["--init", str(micro_run / "sft" / "ckpt.pt"), "--epochs", "0",
                        "--online_rounds", "1", "--online_pairs", "4", "--batch_size", "2",
                        "--online_judge", "flatjudge:flat", "--val_data", "",
                        "--max_new_tokens", "8", "--out_dir", str(tmp_path / "odpo"),
                        "--online_prompts", str(micro_run / "world" / "prompts_rl.jsonl")])
    assert record.read_metrics(tmp_path / "odpo" / "metrics.jsonl") == []
    assert not (tmp_path / "odpo" / "ckpt.pt").exists()


# ----------------------------------------------------------------------------------- the GPU check

@pytest.mark.slow
def test_gpu_check_runs_every_part_dry_on_the_cpu(tmp_path):
    """The script a lent GPU runs first: every part on the CPU at the smallest sizes."""
    from nanoalign import gpu_check
    result = gpu_check.main(["--dry", "--out", str(tmp_path), "--stages", "pretrain,sft,dpo"])
    failed = {name: p["tail"] for name, p in result["parts"].items() if not p["ok"]}
    assert result["ok"], failed
    ddp = result["parts"]["ddp"]
    assert ddp["backend"] == "gloo" and ddp["ranks_agree"] and min(ddp["rows_logged"].values()) > 0
    assert set(result["parts"]["pipeline"]["figures"]["stages"]) >= {"sft", "dpo"}
    items = [row["item"] for row in result["parts"]["speed"]["figures"]["rows"]]
    assert any(i.startswith("pretrain") for i in items) and "ppo bfloat16" in items
    assert {"generate cache greedy", "generate cache sampled"} <= set(items)  # new tokens/s
    assert json.loads((tmp_path / "gpu_check.json").read_text())["ok"]
