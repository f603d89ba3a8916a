"""
Benchmarks: how fast each stage runs here, and how close to the machine's limit (MFU).

    python -m nanoalign.bench            # the tiny preset's sizes (the stages' defaults); ~2 min
    python -m nanoalign.bench --peers    # the sizes of the TRL peer runs
    python -m nanoalign.bench --quick --json --only sft,rm   # micro sizes; one JSON object

Each item times the stages' own functions on fresh models and random tokens (benchkit.py measures
and prints). Throughputs count real (non-pad) tokens; MFU = training FLOPs per token x tokens/s /
peak (PaLM appendix B). No response ever ends (END = -1), so every rollout generates its whole
budget. A peer's figure may sit beside ours only if measured in the same run.
"""

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass, replace
from unittest import mock

import torch
import torch.nn.functional as F

from nanoalign import common, rl
from nanoalign.benchkit import (END, PAD, TRL_REFERENCE, Bench, measure, new_model,
                                peers_side_by_side, print_table, random_pairs, random_seqs,
                                train_step)
from nanoalign.generate import generate
from nanoalign.machine import clock
from nanoalign.model import GPTConfig
from nanoalign.train_dpo import DPOConfig, dpo_loss, policy_and_reference_logps
from nanoalign.train_grpo import GRPOConfig, group_advantages, grpo_update
from nanoalign.train_ppo import PPOConfig, advantages_and_returns, ppo_update
from nanoalign.train_pretrain import PretrainConfig
from nanoalign.train_rm import RMConfig, bt_loss
from nanoalign.train_sft import SFTConfig, collate, sft_loss


@dataclass
class BenchConfig:
    n_layer: int = 4  # the tiny preset's model
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 512
    seq_len: int = 128  # pretraining and SFT sequence length
    batch_size: int = 16  # pretraining sequences per step; prompts per generate() call
    sft_batch: int = SFTConfig.batch_size  # SFT sequences per step
    pairs: int = RMConfig.batch_size  # RM and DPO pairs per step
    prompt_len: int = 32  # longest prompt (RM, DPO, generation, RL)
    response_len: int = 32  # longest RM/DPO response
    ragged: bool = True  # lengths uniform in [len/2, len], so padding is exercised
    gelu: str = GPTConfig.gelu  # the stages' default; HF GPT-2 uses the tanh form
    gen_new: int = 128  # new tokens per generate() call with the KV cache
    gen_new_nocache: int = 32  # without the cache each step re-reads the prefix: O(N^2)
    ppo_batch: int = PPOConfig.batch_size  # rollouts per PPO iteration
    grpo_prompts: int = GRPOConfig.prompts_per_iter  # prompts per GRPO iteration
    grpo_group: int = GRPOConfig.group_size  # completions per prompt
    rl_new: int = PPOConfig.max_new_tokens  # new tokens per rollout
    rl_minibatches: int = PPOConfig.minibatches  # optimizer steps per epoch (PPO and GRPO)
    rl_epochs: int = PPOConfig.ppo_epochs  # passes over a rollout batch
    warmup: int = 2  # untimed calls before each item (allocator, thread pool, torch.compile)
    repeats: int = 7  # timed calls per item: the median is reported
    slow_repeats: int = 5  # timed calls of the slow items (RL, bf16 on CPU, no-cache generation)
    peak_n: int = 1024  # matmul size of the peak measurement on CPU (8192 on CUDA)


# The TRL peer runs' sizes: SFT 16 x 128; RM/DPO 16 pairs x (32+32); PPO 16 x (32 + 32 new), 1
# epoch of 1 minibatch; GRPO 8 prompts x 2; generation 16 x (32 + 128 new); GPT-2's tanh GELU
PEERS = dict(sft_batch=16, pairs=16, ragged=False, gen_new_nocache=128, ppo_batch=16,
             grpo_prompts=8, grpo_group=2, rl_new=32, rl_minibatches=1, rl_epochs=1, gelu="tanh")
QUICK = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, seq_len=32, batch_size=4, sft_batch=4,
             pairs=4, prompt_len=8, response_len=8, gen_new=8, gen_new_nocache=4, ppo_batch=4,
             grpo_prompts=2, grpo_group=2, rl_new=8, rl_minibatches=1, rl_epochs=1, warmup=1,
             repeats=2, slow_repeats=1, peak_n=256)


def bench_pretrain(b: Bench, key, model, batch: int, T: int, dtype: str, compile=False):
    """train_pretrain's step: next-token cross-entropy under autocast, AdamW, clipping."""
    pc = PretrainConfig
    optimizer = common.make_optimizer(model, pc.lr, pc.weight_decay)
    forward = torch.compile(model) if compile else model
    xy = torch.randint(0, model.config.vocab_size, (batch, T + 1), device=b.device)

    def step():
        with common.autocast(b.device, dtype):
            logits = forward(xy[:, :-1]).float()
            loss = F.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten())  # (B*T, V), (B*T,)
        train_step(model, optimizer, loss, pc.grad_clip)
    slow = dtype != "float32" and not b.device.startswith("cuda")  # machine.NATIVE_BF16
    b.item(key, step, batch * T, "tok/s", slow, batch * T, model.flops_per_token(T))
    if compile:  # the warm-up calls compile: say how long that took
        b.rows[-1]["note"] = f"warm-up with compile {b.rows[-1]['warmup_s']:.0f} s"


def bench_pretrain_all(b: Bench, args):
    c, cuda = b.cfg, b.device.startswith("cuda")
    variants = [("fp32", "float32", False), ("bf16 autocast", "bfloat16", False)]
    if args.compile:
        variants += [("fp32 compiled", "float32", True), ("bf16 compiled", "bfloat16", True)]
    # our sizes; GPT-2 124M (12 layers x 12 heads x 768), on CUDA only
    gpt2 = dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, gelu="tanh")
    shapes = [("pretrain", dict(block_size=c.seq_len), c.batch_size, c.seq_len)]
    shapes += [("pretrain GPT-2 124M", gpt2, 8, 1024)] if cuda and not args.quick else []
    for prefix, sizes, batch, T in shapes:
        for name, dtype, comp in variants:
            model = new_model(c, b.device, **sizes)
            bench_pretrain(b, f"{prefix} {name}", model, batch, T, dtype, comp)


def bench_generate(b: Bench, args):
    """generate() with the KV cache (greedy, sampled, sampled at 4x the batch) and without it. At
    equal lengths (--peers) the no-cache row notes how much faster the cache is."""
    c = b.cfg
    model = new_model(c, b.device).eval()
    runs = [("generate cache greedy", 0.0, True, c.gen_new, c.batch_size),
            ("generate cache sampled", 1.0, True, c.gen_new, c.batch_size),
            ("generate cache 4x batch", 1.0, True, c.gen_new, 4 * c.batch_size),
            ("generate no-cache sampled", 1.0, False, c.gen_new_nocache, c.batch_size)]
    for key, temperature, cache, new, batch in runs:
        prompts = random_seqs(c, batch, c.prompt_len, seed=1, ragged=False)

        def step():
            tokens, mask, P = generate(model, prompts, new, END, PAD, temperature, use_cache=cache)
            assert mask[:, P:].all(), "every row generates all its new tokens"
        note = f"{batch} x {new} new" + (", sampled" if temperature else ", greedy")
        b.item(key, step, batch * new, "new tok/s", slow=not cache, note=note)
    rate = {r["item"]: r["rate"] for r in b.rows}
    if c.gen_new_nocache == c.gen_new:
        ratio = rate["generate cache sampled"] / rate["generate no-cache sampled"]
        b.rows[-1]["note"] += f"; the cache is {ratio:.1f}x faster"


def bench_sft(b: Bench, args):
    """train_sft's step: collate, then sft_loss over the labelled tokens (here all of them)."""
    c, sc = b.cfg, SFTConfig
    model = new_model(c, b.device)
    optimizer = common.make_optimizer(model, sc.lr, sc.weight_decay)
    examples = [(s, s) for s in random_seqs(c, c.sft_batch, c.seq_len, seed=2)]
    n_real = sum(len(s) for s, _ in examples)

    def step():
        tokens, labels = collate(examples, PAD, b.device)
        with common.autocast(b.device, sc.dtype):  # every token but a row's first is a target
            loss = sft_loss(model(tokens), labels, n_real - len(examples))
        train_step(model, optimizer, loss, sc.grad_clip)
    flops = model.flops_per_token(c.seq_len)
    b.item("sft", step, n_real, "tok/s", tokens=n_real, flops_per_token=flops)


def bench_rm(b: Bench, args):
    """train_rm's step: chosen and rejected in one forward, the Bradley-Terry loss."""
    model = new_model(b.cfg, b.device).add_scalar_head("reward")
    optimizer = common.make_optimizer(model, RMConfig.lr, RMConfig.weight_decay)
    pairs, n_real = random_pairs(b.cfg, seed=3)

    def step():
        loss = bt_loss(*rl.pair_rewards(model, pairs, PAD, b.device))[0]
        train_step(model, optimizer, loss, RMConfig.grad_clip)
    b.item("rm", step, len(pairs), "pairs/s", tokens=n_real)


def bench_dpo(b: Bench, args):
    """train_dpo's step: the frozen reference's log-probs without grad, then the policy's, on the
    same batch (one forward of 2B rows each), the loss."""
    policy = new_model(b.cfg, b.device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = common.make_optimizer(policy, DPOConfig.lr, 0.0)
    pairs, n_real = random_pairs(b.cfg, seed=4)

    def step():
        logps = policy_and_reference_logps(policy, ref, pairs, PAD, b.device, DPOConfig.dtype)
        losses, _, _ = dpo_loss(*logps, DPOConfig.beta)
        train_step(policy, optimizer, losses.mean(), DPOConfig.grad_clip)
    b.item("dpo", step, len(pairs), "pairs/s", tokens=n_real)


def bench_rl(b: Bench, key: str, unit: str, cfg, prompts, update, note: str, **rollout):
    """One RL iteration as train_ppo and train_grpo run it: rollout, the reward at the last real
    token, update(policy, optimizer, ro, scores, it). Timed in parts: generate; score (the
    forwards of the policy, the reference and the reward model); update."""
    policy = new_model(b.cfg, b.device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = new_model(b.cfg, b.device, seed=1).add_scalar_head("reward").eval().requires_grad_(False)
    if rollout.get("with_values"):  # PPO's value head on the policy's trunk, after the copy
        policy.add_scalar_head("zero")
    optimizer = common.make_optimizer(policy, cfg.lr, 0.0, eps=1e-5)
    generator, sample, it = torch.Generator(device=b.device).manual_seed(0), rl.generate, [0]

    def step():
        parts = {"generate": 0.0}

        def timed_sample(*args, **kwargs):  # rl.rollout's sampling, apart from its forwards
            t = clock(b.device)
            out = sample(*args, **kwargs)
            parts["generate"] += clock(b.device) - t
            return out
        t0 = clock(b.device)
        with mock.patch.object(rl, "generate", timed_sample):
            ro = rl.rollout(policy, ref, prompts=prompts, end_id=END, pad_id=PAD,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            generator=generator, **rollout)
        scores = rl.score_last_token(rm, ro.tokens, ro.pad_mask)
        t1 = clock(b.device)
        update(policy, optimizer, ro, scores, it[0] % cfg.iterations)
        it[0] += 1
        return {"generate": parts["generate"], "score": t1 - t0 - parts["generate"],
                "update": clock(b.device) - t1}
    note += f"{cfg.max_new_tokens} new; {cfg.ppo_epochs} ep x {cfg.minibatches} mb"
    b.item(key, step, len(prompts), unit, slow=True, note=note)


def bench_ppo(b: Bench, args, dtype="float32"):
    c, d = b.cfg, common.Dist(device=b.device)
    cfg = PPOConfig(batch_size=c.ppo_batch, minibatches=c.rl_minibatches, ppo_epochs=c.rl_epochs,
                    max_new_tokens=c.rl_new, iterations=c.warmup + c.slow_repeats, dtype=dtype)

    def update(policy, optimizer, ro, scores, it):
        advantages, returns, _ = advantages_and_returns(ro, scores, cfg.kl_coef, cfg)
        ppo_update(policy, optimizer, ro, advantages, returns, cfg, it, d)
    bench_rl(b, "ppo" if dtype == "float32" else f"ppo {dtype}", "rollouts/s", cfg,
             random_seqs(c, cfg.batch_size, c.prompt_len, seed=5), update, f"{cfg.batch_size} x ",
             with_values=True, minibatch=cfg.batch_size // cfg.minibatches, dtype=dtype)


def bench_grpo(b: Bench, args):
    c, d = b.cfg, common.Dist(device=b.device)
    cfg = GRPOConfig(prompts_per_iter=c.grpo_prompts, group_size=c.grpo_group,
                     minibatches=c.rl_minibatches, ppo_epochs=c.rl_epochs, max_new_tokens=c.rl_new)

    def update(policy, optimizer, ro, scores, it):
        # train_grpo's phases 2-3: the k1 penalty in the reward, group advantages, the updates
        kl = rl.masked_sum(ro.logprobs - ro.ref_logprobs, ro.response_mask, 1)
        rewards = (scores - cfg.kl_coef * kl).view(-1, cfg.group_size)  # (n_groups, G)
        advantages = group_advantages(rewards, cfg.estimator, cfg.scale_by_std).view(-1)  # (B,)
        grpo_update(policy, optimizer, ro, advantages, torch.ones_like(advantages, dtype=bool),
                    cfg, it, d)
    prompts = [p for p in random_seqs(c, cfg.prompts_per_iter, c.prompt_len, seed=6)
               for _ in range(cfg.group_size)]
    bench_rl(b, "grpo", "compl/s", cfg, prompts, update,
             f"{cfg.prompts_per_iter} x {cfg.group_size} x ",
             minibatch=len(prompts) // cfg.minibatches)


SECTIONS = {"pretrain": bench_pretrain_all, "generate": bench_generate, "sft": bench_sft,
            "rm": bench_rm, "dpo": bench_dpo, "ppo": bench_ppo, "grpo": bench_grpo}


def run(args) -> dict:
    sizes = {**(PEERS if args.peers else {}), **(QUICK if args.quick else {})}  # quick wins
    c = replace(BenchConfig(), **sizes)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = auto if args.device == "auto" else args.device
    items = [SECTIONS[name] for name in (args.only.split(",") if args.only else SECTIONS)]
    result = measure(Bench(c, device, []), [lambda b, f=f: f(b, args) for f in items], c.peak_n)
    preset = "quick" if args.quick else "peers" if args.peers else "tiny"
    return {"command": args.command, "preset": preset, "sizes": asdict(c), **result}


def main(argv=None):
    # plain argparse rather than config.parse_config: these are switches (`--json`, no value)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--json", action="store_true", help="print one JSON object on stdout, not the table")
    add("--quick", action="store_true", help="micro sizes and 2 repeats: seconds (the smoke test)")
    add("--peers", action="store_true", help="the sizes of the TRL peer runs")
    add("--compile", action="store_true", help="add torch.compile variants of pretraining")
    add("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    add("--device", default="auto", help="auto | cpu | cuda")
    add("--peer_python", default="", help="a Python with TRL: run the TRL peer script beside us, "
        "alternating, and print the ratios of each round (implies --peers)")
    add("--peer_script", default="", help="with --peer_python: the TRL benchmark script")
    add("--rounds", type=int, default=2, help="with --peer_python: rounds of ours, TRL's")
    args = parser.parse_args(argv)
    if set(filter(None, args.only.split(","))) - set(SECTIONS):
        parser.error(f"--only: sections are {','.join(SECTIONS)}")
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python -m nanoalign.bench", *given])
    if args.peer_python:
        return peers_side_by_side(args, run, SECTIONS)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
        print("\n" + TRL_REFERENCE if args.peers else "", end="")
    return result


if __name__ == "__main__":
    main()
