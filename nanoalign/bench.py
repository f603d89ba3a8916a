"""
Benchmarks: how fast each stage runs here, and how close to the machine's limit (MFU).

    python -m nanoalign.bench            # a table at the tiny preset's sizes (the stages' defaults); ~2 min, 2 cores
    python -m nanoalign.bench --peers    # exactly the sizes of the TRL peer runs, TRL's figures beside ours
    python -m nanoalign.bench --json     # one JSON object on stdout instead (progress goes to stderr)
    python -m nanoalign.bench --quick    # micro sizes, seconds: the smoke test
    python -m nanoalign.bench --compile --char   # + torch.compile variants; + nanoGPT's char-level size (vocab 65)
    python -m nanoalign.bench --only choices     # each speed choice of the stages against what it replaced

Each item runs the stages' own functions on fresh models and random tokens (no data, no checkpoint) and reports the
median of several timed calls after warm-up calls. Throughputs count real (non-pad) tokens. MFU = training FLOPs per
token x tokens/s / peak (PaLM appendix B; nanoGPT's estimate_mfu); the peak is the best fp32 matmul measured here on
CPU, the card's nominal bf16 peak on CUDA. Shared machines are noisy, so the TRL peer runs' probe (fp32 512x512
matmuls) is reported before and after. No response ever ends (END = -1): every rollout generates its whole budget,
as min_new_tokens makes TRL do in the peer runs, i.e. the worst case of a stage's length limit.
"""

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from unittest import mock

import torch
import torch.nn.functional as F

from nanoalign import common, rl
from nanoalign.generate import generate
from nanoalign.model import GPT, GPTConfig
from nanoalign.train_dpo import DPOConfig, concatenated_logps, dpo_loss
from nanoalign.train_grpo import GRPOConfig, group_advantages, grpo_update
from nanoalign.train_ppo import PPOConfig, advantages_and_returns, ppo_update
from nanoalign.train_pretrain import PretrainConfig
from nanoalign.train_rm import RMConfig, bt_loss, pair_rewards
from nanoalign.train_sft import SFTConfig, collate, sft_loss

PAD, END = 0, -1  # random tokens are drawn from 1..V-1, so no row ever emits END


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
    ragged: bool = True  # lengths uniform in [len/2, len] so padding is exercised (False: all full length)
    gelu: str = GPTConfig.gelu  # the stages' default; the peer runs' HF GPT-2 uses the tanh form ("gelu_new")
    gen_new: int = 128  # new tokens per generate() call with the KV cache
    gen_new_nocache: int = 32  # without the cache each step re-reads the whole prefix (O(N^2)): a shorter call
    ppo_batch: int = PPOConfig.batch_size  # rollouts per PPO iteration
    grpo_prompts: int = GRPOConfig.prompts_per_iter  # prompts per GRPO iteration
    grpo_group: int = GRPOConfig.group_size  # completions per prompt
    rl_new: int = PPOConfig.max_new_tokens  # new tokens per rollout
    rl_minibatches: int = PPOConfig.minibatches  # optimizer steps per epoch over a rollout batch (PPO and GRPO)
    rl_epochs: int = PPOConfig.ppo_epochs  # passes over a rollout batch
    warmup: int = 2  # untimed calls before each item (allocator, thread pool, torch.compile)
    repeats: int = 7  # timed calls per item: the median is reported
    slow_repeats: int = 5  # timed calls of the slow items (RL iterations, bf16 on CPU, no-cache generation)
    peak_n: int = 1024  # matmul size of the peak measurement on CPU (8192 on CUDA)


# the peer runs (../shared/peers/README.md): SFT 16 x 128; RM/DPO 16 pairs x (32+32); PPO 16 x (32 + 32 new), 1 epoch
# of 1 minibatch; GRPO 8 prompts x 2; generation 16 x (32 + 128 new), with and without the cache; HF GPT-2's tanh GELU
PEERS = dict(sft_batch=16, pairs=16, ragged=False, gen_new_nocache=128, ppo_batch=16, grpo_prompts=8, grpo_group=2,
             rl_new=32, rl_minibatches=1, rl_epochs=1, gelu="tanh")
QUICK = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, seq_len=32, batch_size=4, sft_batch=4, pairs=4,
             prompt_len=8, response_len=8, gen_new=8, gen_new_nocache=4, ppo_batch=4, grpo_prompts=2, grpo_group=2,
             rl_new=8, rl_minibatches=1, rl_epochs=1, warmup=1, repeats=2, slow_repeats=1, peak_n=256)
# TRL 1.16.0 (PPO: 1.12.0), fp32 on the same kind of 2-core machine (../shared/peers/trl-results.json), in our rows'
# units; "pretrain fp32" is set against HF's GPT-2 in a plain PyTorch loop (TRL's SFTTrainer adds ~15% to that)
TRL = {"pretrain fp32": (9746.1, "HF GPT-2 loop"), "sft": (8458.9, "SFTTrainer"), "rm": (74.2, "RewardTrainer"),
       "dpo": (36.5, "DPOTrainer"), "ppo": (13.9, "PPOTrainer"), "grpo": (43.5, "GRPOTrainer"),
       "generate cache sampled": (2459.2, "HF generate"), "generate no-cache sampled": (254.4, "HF generate")}
# dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets); the first name found in the device's name wins
NOMINAL_BF16_TFLOPS = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312),
                       ("L40S", 362), ("L40", 181), ("L4", 121), ("RTX 4090", 165), ("RTX 3090", 71), ("A10", 125)]


def clock(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # CUDA calls return before their kernels finish
    return time.perf_counter()


def measure(step, warmup: int, repeats: int, device: str):
    """step() `warmup` times untimed, then `repeats` timed calls. step() may return {part: seconds}, a split of its
    own time. Returns (median seconds, every time, {part: median seconds}, warm-up seconds)."""
    t = clock(device)
    for _ in range(warmup):
        step()
    warmup_s, times, parts = clock(device) - t, [], {}
    for _ in range(repeats):
        t = clock(device)
        split = step() or {}
        times.append(clock(device) - t)
        for k, v in split.items():
            parts.setdefault(k, []).append(v)
    return statistics.median(times), times, {k: statistics.median(v) for k, v in parts.items()}, warmup_s


@contextmanager
def time_calls(module, name: str, parts: dict, device: str):
    """Add the time of every call of module.name to parts[name]: how rl.rollout's generation is told apart from its
    scoring forwards without changing rl.rollout."""
    fn = getattr(module, name)

    def timed(*args, **kwargs):
        t = clock(device)
        out = fn(*args, **kwargs)
        parts[name] = parts.get(name, 0.0) + clock(device) - t
        return out
    with mock.patch.object(module, name, timed):
        yield


def peak_memory_mb(device: str) -> float:
    """CUDA: the most allocated since the item started. CPU: the process's peak RSS so far (it never goes down)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # POSIX only; ru_maxrss is in kB on Linux, in bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def matmul_gflops(n: int, dtype=torch.float32, device="cpu", repeats=5, calls=0, stat=max) -> float:
    """GFLOP/s of n x n matmuls: `stat` over `repeats` samples of `calls` matmuls (0: enough to last ~0.1 s, so timer
    resolution and launch overhead do not count). A peak takes the max: the best this machine gave."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = clock(device)
    a @ b
    calls = calls or max(1, int(0.1 / max(clock(device) - t, 1e-6)))
    rates = []
    for _ in range(repeats):
        t = clock(device)
        for _ in range(calls):
            a @ b
        rates.append(2 * n ** 3 * calls / (clock(device) - t) / 1e9)
    return stat(rates)


def probe() -> float:
    """The peer runs' machine-speed probe, so the numbers compare: 7 samples of 10 fp32 512x512 matmuls, median."""
    return matmul_gflops(512, repeats=7, calls=10, stat=statistics.median)


def new_model(c: BenchConfig, device: str, seed=0, **sizes) -> GPT:
    """A freshly initialised GPT of the bench's sizes; keyword arguments override GPTConfig fields."""
    torch.manual_seed(seed)
    block = max(c.seq_len, c.prompt_len + max(c.response_len, c.gen_new, c.rl_new))
    cfg = dict(block_size=block, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
               gelu=c.gelu)
    return GPT(GPTConfig(**{**cfg, **sizes})).to(device)


def random_seqs(c: BenchConfig, n: int, length: int, seed: int, ragged=None) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo = length // 2 if (c.ragged if ragged is None else ragged) else length
    return [torch.randint(1, c.vocab_size, (int(L),), generator=g).tolist()
            for L in torch.randint(max(1, lo), length + 1, (n,), generator=g)]


def random_pairs(c: BenchConfig, seed: int):
    """(prompt, chosen, rejected) token lists as tokenize_pref lays them out, and their real token count."""
    pairs = list(zip(random_seqs(c, c.pairs, c.prompt_len, seed), random_seqs(c, c.pairs, c.response_len, seed + 1),
                     random_seqs(c, c.pairs, c.response_len, seed + 2)))
    return pairs, sum(2 * len(p) + len(ch) + len(r) for p, ch, r in pairs)


def optimizer_step(model, optimizer, loss, grad_clip: float) -> float:
    """backward -> clip -> step -> zero_grad, every stage's order; .item() syncs as the stages' logging does."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@dataclass
class Bench:
    cfg: BenchConfig
    device: str
    peers: bool  # add TRL's figures
    rows: list

    def item(self, key, step, units, unit, slow=False, tokens=None, flops_per_token=None, note=""):
        """Time step() and add a row: `units` per call -> rate; `tokens` (real ones) per call -> tok/s, and with the
        model's training FLOPs per token the achieved GFLOP/s, which run() divides by the peak (MFU)."""
        print(f"[bench] {key} ...", file=sys.stderr, flush=True)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sec, times, parts, warmup_s = measure(step, self.cfg.warmup, self.cfg.slow_repeats if slow else
                                              self.cfg.repeats, self.device)
        tok_s = tokens / sec if tokens else None
        self.add_row(key, sec, times, units / sec, unit, note, tok_s,
                     flops_per_token * tok_s / 1e9 if flops_per_token else None, parts, warmup_s)

    def add_row(self, key, sec, times, rate, unit, note="", tok_s=None, gflops=None, parts=None, warmup_s=None):
        """One row of the table and of the JSON, whichever way it was timed."""
        row = {"item": key, "ms": 1000 * sec, "rate": rate, "unit": unit, "tok_s": tok_s, "gflops": gflops,
               "note": note, "split_ms": {k: 1000 * v for k, v in (parts or {}).items()},
               "times_ms": [1000 * t for t in times], "warmup_s": warmup_s, "peak_mem_mb": peak_memory_mb(self.device)}
        if self.peers and key in TRL:
            row["trl"] = {"rate": TRL[key][0], "what": TRL[key][1], "ours_over_trl": row["rate"] / TRL[key][0]}
        self.rows.append(row)


def bench_pretrain(b: Bench, key, model, batch: int, T: int, dtype: str, compile=False, note=""):
    """train_pretrain's step: next-token cross-entropy under autocast, AdamW and clipping with its defaults."""
    pc = PretrainConfig
    optimizer = common.make_optimizer(model, pc.lr, pc.weight_decay)
    forward = torch.compile(model) if compile else model
    xy = torch.randint(0, model.config.vocab_size, (batch, T + 1), device=b.device)

    def step():
        with common.autocast(b.device, dtype):
            loss = F.cross_entropy(forward(xy[:, :-1]).float().flatten(0, 1), xy[:, 1:].flatten())
        optimizer_step(model, optimizer, loss, pc.grad_clip)
    slow = dtype != "float32" and not b.device.startswith("cuda")  # CPUs without AVX512-BF16/AMX emulate bf16
    b.item(key, step, batch * T, "tok/s", slow, batch * T, model.flops_per_token(T), note)
    if compile:  # the warm-up calls compile: say how long that took
        b.rows[-1]["note"] = f"warm-up with compile {b.rows[-1]['warmup_s']:.0f} s"


def bench_pretrain_all(b: Bench, args):
    c, cuda = b.cfg, b.device.startswith("cuda")
    variants = [("fp32", "float32", False), ("bf16 autocast", "bfloat16", False)]
    variants += [("fp32 compiled", "float32", True), ("bf16 compiled", "bfloat16", True)] if args.compile else []
    for name, dtype, comp in variants:
        model = new_model(c, b.device, block_size=c.seq_len)
        bench_pretrain(b, f"pretrain {name}", model, c.batch_size, c.seq_len, dtype, comp)
    if args.char:  # nanoGPT's train.py ran 13-18k tokens/s at this size on these machines
        model = new_model(c, b.device, block_size=128, vocab_size=65, n_layer=4, n_head=4, n_embd=128)
        bench_pretrain(b, "pretrain char-level", model, 16, 128, "float32", note="nanoGPT: 13-18k tok/s")
        model = new_model(c, b.device, block_size=128, vocab_size=65, n_layer=4, n_head=4, n_embd=128, bias=False,
                          gelu="none")  # nanoGPT's defaults: no biases, the exact GELU
        bench_pretrain(b, "pretrain char-level, nanoGPT's layers", model, 16, 128, "float32")
    for name, dtype, comp in variants if cuda and not args.quick else []:  # GPT-2 124M: 12 x 12 heads x 768 wide
        model = new_model(c, b.device, block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768,
                          gelu="tanh")
        bench_pretrain(b, f"pretrain GPT-2 124M {name}", model, 8, 1024, dtype, comp)


def bench_generate(b: Bench, args):
    c = b.cfg
    model = new_model(c, b.device).eval()
    prompts = random_seqs(c, c.batch_size, c.prompt_len, seed=1, ragged=False)
    for key, temperature, cache, new in [("generate cache greedy", 0.0, True, c.gen_new),
                                         ("generate cache sampled", 1.0, True, c.gen_new),
                                         ("generate no-cache sampled", 1.0, False, c.gen_new_nocache)]:
        def step():
            tokens, mask, P = generate(model, prompts, new, END, PAD, temperature, use_cache=cache)
            assert mask[:, P:].all(), "every row generates all its new tokens"
        b.item(key, step, len(prompts) * new, "new tok/s", slow=not cache, note=f"{len(prompts)} x {new} new")


def bench_sft(b: Bench, args):
    """train_sft's step: collate, then sft_loss over the labelled tokens (here all of them, as TRL's 'text' SFT)."""
    c, sc = b.cfg, SFTConfig
    model = new_model(c, b.device)
    optimizer = common.make_optimizer(model, sc.lr, sc.weight_decay)
    examples = [(s, s) for s in random_seqs(c, c.sft_batch, c.seq_len, seed=2)]
    n_real = sum(len(s) for s, _ in examples)

    def step():
        tokens, labels = collate(examples, PAD, b.device)
        with common.autocast(b.device, sc.dtype):
            loss = sft_loss(model(tokens), labels, n_real - len(examples))  # targets shift by one
        optimizer_step(model, optimizer, loss, sc.grad_clip)
    b.item("sft", step, n_real, "tok/s", tokens=n_real, flops_per_token=model.flops_per_token(c.seq_len))


def bench_rm(b: Bench, args):
    """train_rm's step: chosen and rejected in one forward, the Bradley-Terry loss."""
    c, rc = b.cfg, RMConfig
    model = new_model(c, b.device).add_scalar_head("reward")
    optimizer = common.make_optimizer(model, rc.lr, rc.weight_decay)
    pairs, n_real = random_pairs(c, seed=3)

    def step():
        optimizer_step(model, optimizer, bt_loss(*pair_rewards(model, pairs, PAD, b.device))[0], rc.grad_clip)
    b.item("rm", step, len(pairs), "pairs/s", tokens=n_real)


def bench_dpo(b: Bench, args):
    """train_dpo's step: the frozen reference's log-probs without grad, then the policy's, on the same batch; one
    forward of 2B rows each."""
    c, dc = b.cfg, DPOConfig
    policy = new_model(c, b.device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = common.make_optimizer(policy, dc.lr, 0.0)
    pairs, n_real = random_pairs(c, seed=4)

    def step():
        t = clock(b.device)
        with torch.no_grad():
            ref_chosen, ref_rejected = concatenated_logps(ref, pairs, PAD, b.device)
        t_ref = clock(b.device) - t
        losses, _, _ = dpo_loss(*concatenated_logps(policy, pairs, PAD, b.device), ref_chosen, ref_rejected, dc.beta)
        optimizer_step(policy, optimizer, losses.mean(), dc.grad_clip)
        return {"reference": t_ref}
    b.item("dpo", step, len(pairs), "pairs/s", tokens=n_real)


def rl_models(b: Bench):
    """Policy, its frozen copy as reference and a separate reward model, as train_ppo and train_grpo build them."""
    policy = new_model(b.cfg, b.device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    return policy, ref, new_model(b.cfg, b.device, seed=1).add_scalar_head("reward").eval().requires_grad_(False)


def rl_step(b: Bench, policy, ref, rm, update, **rollout_kwargs):
    """One RL iteration as train_ppo / train_grpo run it: rollout, reward at the last real token, update. Split into
    generate, score (policy log-probs and values, reference and reward forwards) and update."""
    generator = torch.Generator(device=b.device).manual_seed(0)

    def step():
        parts = {"generate": 0.0}
        t0 = clock(b.device)
        with time_calls(rl, "generate", parts, b.device):
            ro = rl.rollout(policy, ref, end_id=END, pad_id=PAD, generator=generator, **rollout_kwargs)
        scores = rl.score_last_token(rm, ro.tokens, ro.pad_mask)
        t1 = clock(b.device)
        update(ro, scores)
        return {"generate": parts["generate"], "score": t1 - t0 - parts["generate"], "update": clock(b.device) - t1}
    return step


def bench_ppo(b: Bench, args, dtype="float32"):
    c = b.cfg
    cfg = PPOConfig(batch_size=c.ppo_batch, minibatches=c.rl_minibatches, ppo_epochs=c.rl_epochs,
                    max_new_tokens=c.rl_new, iterations=c.warmup + c.slow_repeats, dtype=dtype)
    policy, ref, rm = rl_models(b)
    policy.add_scalar_head("zero")  # the value head on the policy's trunk, added after the reference was copied
    optimizer = common.make_optimizer(policy, cfg.lr, 0.0, eps=1e-5)
    d, it = common.Dist(device=b.device), [0]

    def update(ro, scores):
        advantages, returns, _ = advantages_and_returns(ro, scores, cfg.kl_coef, cfg)
        ppo_update(policy, optimizer, ro, advantages, returns, cfg, it[0] % cfg.iterations, d)
        it[0] += 1
    step = rl_step(b, policy, ref, rm, update, prompts=random_seqs(c, cfg.batch_size, c.prompt_len, seed=5),
                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, with_values=True,
                   minibatch=cfg.batch_size // cfg.minibatches, dtype=dtype)
    b.item("ppo" if dtype == "float32" else f"ppo {dtype}", step, cfg.batch_size, "rollouts/s", slow=True,
           note=f"{cfg.batch_size} x {cfg.max_new_tokens} new; {cfg.ppo_epochs} ep x {cfg.minibatches} mb")


def bench_grpo(b: Bench, args):
    c = b.cfg
    cfg = GRPOConfig(prompts_per_iter=c.grpo_prompts, group_size=c.grpo_group, minibatches=c.rl_minibatches,
                     ppo_epochs=c.rl_epochs, max_new_tokens=c.rl_new)
    policy, ref, rm = rl_models(b)
    optimizer = common.make_optimizer(policy, cfg.lr, 0.0, eps=1e-5)
    prompts = [p for p in random_seqs(c, cfg.prompts_per_iter, c.prompt_len, seed=6) for _ in range(cfg.group_size)]
    d, it = common.Dist(device=b.device), [0]

    def update(ro, scores):  # steps 2-3 of train_grpo.train: k1 penalty in the reward, group advantages, updates
        rewards = scores - cfg.kl_coef * rl.masked_sum(ro.logprobs - ro.ref_logprobs, ro.response_mask, 1)
        advantages = group_advantages(rewards.view(-1, cfg.group_size), cfg.estimator, cfg.scale_by_std).view(-1)
        keep = torch.ones_like(advantages, dtype=torch.bool)
        grpo_update(policy, optimizer, ro, advantages, keep, cfg, it[0] % cfg.iterations, d)
        it[0] += 1
    step = rl_step(b, policy, ref, rm, update, prompts=prompts, max_new_tokens=cfg.max_new_tokens,
                   temperature=cfg.temperature, minibatch=len(prompts) // cfg.minibatches)
    b.item("grpo", step, len(prompts), "compl/s", slow=True, note=f"{cfg.prompts_per_iter} x {cfg.group_size} x "
           f"{cfg.max_new_tokens} new; {cfg.ppo_epochs} ep x {cfg.minibatches} mb")


def interleaved(b: Bench, key: str, chosen, alternative, alternative_name: str):
    """Time a choice of the stages against its alternative call by call in turn (A, B, A, B, ...), so that the
    machine's drift, which can swamp a few per cent between separate runs, hits both alike."""
    print(f"[bench] {key} ...", file=sys.stderr, flush=True)
    for _ in range(b.cfg.warmup):
        chosen(), alternative()
    times = {chosen: [], alternative: []}
    for _ in range(2 * b.cfg.repeats):
        for step in (chosen, alternative):
            t = clock(b.device)
            step()
            times[step].append(clock(b.device) - t)
    sec, alt_sec = (statistics.median(times[f]) for f in (chosen, alternative))
    b.add_row(key, sec, times[chosen], alt_sec / sec, "x", f"{alternative_name} {1000 * alt_sec:.1f} ms")


def bench_choices(b: Bench, args):
    """The stages' speed choices, each against what it replaced: the exact GELU (vs GPT-2's tanh form), the fused
    AdamW (vs PyTorch's CPU default, a Python loop over the parameters), and right-padded batches without an
    attention mask (vs passing the pad mask). Rate = the alternative's time / the choice's: above 1, the choice wins."""
    c = b.cfg

    def pretrain_step(gelu, fused):
        model = new_model(c, b.device, block_size=c.seq_len, gelu=gelu)
        optimizer = common.make_optimizer(model, PretrainConfig.lr, PretrainConfig.weight_decay)
        for group in optimizer.param_groups if not fused else []:
            group.update(fused=None, foreach=False)  # the single-tensor loop
        xy = torch.randint(0, c.vocab_size, (c.batch_size, c.seq_len + 1), device=b.device)
        return lambda: optimizer_step(model, optimizer, F.cross_entropy(model(xy[:, :-1]).flatten(0, 1),
                                                                        xy[:, 1:].flatten()), 1.0)
    interleaved(b, "choice: exact GELU", pretrain_step("none", True), pretrain_step("tanh", True), "tanh GELU")
    interleaved(b, "choice: fused AdamW", pretrain_step("none", True), pretrain_step("none", False), "AdamW loop")

    def masked(model):  # the alternative: the same call with the pad mask (random tokens are never PAD)
        return lambda tokens, **kw: model(tokens, pad_mask=tokens != PAD, **kw)
    model = new_model(c, b.device)
    sft_opt = common.make_optimizer(model, SFTConfig.lr, 0.0)
    examples = [(s, s) for s in random_seqs(c, c.sft_batch, c.seq_len, seed=2)]
    n_trained = sum(len(s) - 1 for s, _ in examples)  # every token but the first is a target, as in bench_sft

    def sft_step(forward):
        tokens, labels = collate(examples, PAD, b.device)
        return lambda: optimizer_step(model, sft_opt, sft_loss(forward(tokens), labels, n_trained), 1.0)
    interleaved(b, "choice: no mask, SFT", sft_step(model), sft_step(masked(model)), "with mask")
    rm = new_model(c, b.device).add_scalar_head("reward")
    rm_opt, pairs = common.make_optimizer(rm, RMConfig.lr, 0.0), random_pairs(c, seed=3)[0]

    def rm_step(forward):
        return lambda: optimizer_step(rm, rm_opt, bt_loss(*pair_rewards(forward, pairs, PAD, b.device))[0], 1.0)
    interleaved(b, "choice: no mask, RM", rm_step(rm), rm_step(masked(rm)), "with mask")


SECTIONS = {"pretrain": bench_pretrain_all, "generate": bench_generate, "sft": bench_sft, "rm": bench_rm,
            "dpo": bench_dpo, "ppo": bench_ppo, "grpo": bench_grpo, "choices": bench_choices}


def machine_peaks(c: BenchConfig, device: str) -> dict:
    cuda = device.startswith("cuda")
    n = 8192 if cuda else c.peak_n
    peaks = {"fp32_gflops": matmul_gflops(n, torch.float32, device),  # CPU bf16 is often emulated (~50x slower): n/2
             "bf16_gflops": matmul_gflops(n if cuda else n // 2, torch.bfloat16, device)}
    if cuda:
        name = torch.cuda.get_device_name(device)
        peaks["nominal_bf16_tflops"] = next((v for k, v in NOMINAL_BF16_TFLOPS if k in name), None)
    return peaks


def run(args) -> dict:
    c = replace(BenchConfig(), **{**(PEERS if args.peers else {}), **(QUICK if args.quick else {})})  # quick wins
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device.startswith("cuda")
    t0, probe_before, peaks = time.time(), probe(), machine_peaks(c, device)
    b = Bench(c, device, args.peers and not args.quick, [])  # TRL's figures only beside runs of the same sizes
    for name in args.only.split(",") if args.only else SECTIONS:
        SECTIONS[name](b, args)
    if not cuda:  # the machine's speed drifts: the peak is the best of a measurement before and after
        peaks["fp32_gflops"] = max(peaks["fp32_gflops"], matmul_gflops(c.peak_n))
    # MFU's denominator: the measured fp32 peak on CPU; the nominal bf16 peak on CUDA (the measured one if unknown)
    peak = 1000 * peaks["nominal_bf16_tflops"] if peaks.get("nominal_bf16_tflops") else \
        peaks["bf16_gflops"] if cuda else peaks["fp32_gflops"]
    for row in b.rows:
        row["mfu"] = row["gflops"] / peak if row["gflops"] else None
    return {"command": args.command, "machine": common.machine_name(device), "device": device,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "preset": "quick" if args.quick else "peers" if args.peers else "tiny", "sizes": asdict(c),
            "peak": peaks, "mfu_peak_gflops": peak, "probe_gflops_before_after": [probe_before, probe()],
            "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "wall_s": time.time() - t0, "rows": b.rows}


def fmt(x) -> str:
    return "" if x is None else f"{x / 1000:.2f}k" if x >= 1e4 else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def print_table(r: dict):
    p, (before, after), peers = r["peak"], r["probe_gflops_before_after"], any("trl" in x for x in r["rows"])
    nominal = f", nominal bf16 {p['nominal_bf16_tflops']} TFLOP/s" if p.get("nominal_bf16_tflops") else ""
    print(f"{r['command']} | {r['machine']} ({r['device']}) | torch {r['torch']} | "
          f"{r['wall_s']:.0f} s\nprobe before/after {before:.0f} / {after:.0f} GFLOP/s | matmul peak fp32 "
          f"{p['fp32_gflops']:.0f}, bf16 {p['bf16_gflops']:.1f} GFLOP/s{nominal} | MFU against "
          f"{r['mfu_peak_gflops']:,.0f} GFLOP/s | load average {(r['load_average_after'] or [0])[0]:.1f}")
    head = f"{'item':<26}{'ms':>9}{'throughput':>20}{'tok/s':>8}{'MFU':>7}{'mem MB':>8}  " + \
        (f"{'TRL (ours/TRL)':<22}" if peers else "") + "split ms; note"
    print(head + "\n" + "-" * len(head))
    for x in r["rows"]:
        trl = f"{fmt(x['trl']['rate'])} ({x['trl']['ours_over_trl']:.2f}x)" if "trl" in x else ""
        split = ", ".join(f"{k} {v:.0f}" for k, v in x["split_ms"].items())
        mfu = f"{100 * x['mfu']:.1f}%" if x["mfu"] else ""
        print(f"{x['item']:<26}{x['ms']:>9.1f}{fmt(x['rate']) + ' ' + x['unit']:>20}{fmt(x['tok_s']):>8}{mfu:>7}"
              f"{x['peak_mem_mb']:>8.0f}  " + (f"{trl:<22}" if peers else "")
              + "; ".join(s for s in (split, x["note"]) if s))


def main(argv=None):
    # plain argparse rather than common.parse_config: these are switches (`--json`, not `--json true`)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    parser.add_argument("--quick", action="store_true", help="micro sizes and 2 repeats: seconds (the smoke test)")
    parser.add_argument("--peers", action="store_true", help="the TRL peer runs' sizes, with TRL's figures")
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants of pretraining")
    parser.add_argument("--char", action="store_true", help="add pretraining at nanoGPT's char-level size")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    if set(filter(None, args.only.split(","))) - set(SECTIONS):
        parser.error(f"--only: sections are {','.join(SECTIONS)}")
    args.command = " ".join(["python -m nanoalign.bench"] + (sys.argv[1:] if argv is None else list(argv)))
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return result


if __name__ == "__main__":
    main()
