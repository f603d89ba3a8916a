"""
Benchmarks: how fast each stage runs on this machine, and how close to the machine's limit.

    python -m nanoalign.bench             # a table at the tiny preset's sizes (the stages' defaults), ~2 min on 2 cores
    python -m nanoalign.bench --peers     # exactly the sizes of the TRL peer runs, with TRL's figures beside ours
    python -m nanoalign.bench --json      # one JSON object on stdout (progress goes to stderr)
    python -m nanoalign.bench --quick     # micro sizes in seconds (what the smoke test runs)
    python -m nanoalign.bench --compile   # add torch.compile variants (inductor needs a C++ compiler; minutes on CPU)
    python -m nanoalign.bench --char      # add pretraining at nanoGPT's shakespeare-char size (vocab 65)

How it measures:
  - each item runs the stages' own code (sft_loss, pair_rewards + bt_loss, concatenated_logps + dpo_loss, rollout,
    advantages_and_returns + ppo_update, group_advantages + clipped_policy_loss, make_optimizer) on freshly
    initialised models and random tokens, so it needs no data and no checkpoint; throughputs count real tokens only;
  - an item's time is the median of several repeats after warm-up calls (CUDA is synchronised around each call);
  - MFU = model FLOPs per token x tokens/s / peak (PaLM appendix B, nanoGPT's estimate_mfu), against the fp32 matmul
    peak measured here on CPU and against the card's nominal bf16 peak on CUDA;
  - shared machines are noisy (a fixed probe ranged 17-170 GFLOP/s on ours): the probe of the TRL peer runs,
    10 fp32 512x512 matmuls, is printed before and after, so a slow period shows beside the figures it touched.
Responses have no end token (end id -1): every rollout generates its whole new-token budget, as min_new_tokens makes
TRL do in the peer runs. That is the worst case of a stage's length limit.
"""

import argparse
import copy
import json
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
from nanoalign.generate import entropy_from_logits, generate, response_logprobs
from nanoalign.model import GPT, GPTConfig
from nanoalign.rl import masked_mean, masked_sum, rollout, score_last_token
from nanoalign.train_dpo import DPOConfig, concatenated_logps, dpo_loss
from nanoalign.train_grpo import GRPOConfig, clipped_policy_loss, group_advantages
from nanoalign.train_ppo import PPOConfig, advantages_and_returns, ppo_update
from nanoalign.train_pretrain import PretrainConfig
from nanoalign.train_rm import RMConfig, bt_loss, pair_rewards
from nanoalign.train_sft import SFTConfig, collate, sft_loss

PAD, END = 0, -1  # random tokens are drawn from 1..V-1; no token equals END, so no response stops early


@dataclass
class BenchConfig:
    n_layer: int = 4  # the tiny preset's model
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 512
    seq_len: int = 128  # pretraining and SFT sequence length (tokens)
    batch_size: int = 16  # pretraining sequences per step
    sft_batch: int = SFTConfig.batch_size  # SFT examples per step
    pairs: int = RMConfig.batch_size  # RM and DPO pairs per step
    prompt_len: int = 32  # longest prompt (RM, DPO, generation, RL)
    response_len: int = 32  # longest RM/DPO response
    ragged: bool = True  # lengths drawn from [len/2, len], so padding is exercised (False: every sequence full)
    gen_batch: int = 16  # prompts per generate() call
    gen_new: int = 128  # new tokens per generate() call with the KV cache
    gen_new_nocache: int = 32  # without the cache every step re-reads the whole prefix (O(N^2)): a shorter call
    ppo_batch: int = PPOConfig.batch_size  # rollouts per PPO iteration
    ppo_minibatches: int = PPOConfig.minibatches
    ppo_epochs: int = PPOConfig.ppo_epochs
    rl_new: int = PPOConfig.max_new_tokens  # new tokens per PPO/GRPO rollout
    grpo_prompts: int = GRPOConfig.prompts_per_iter
    grpo_group: int = GRPOConfig.group_size
    grpo_minibatches: int = GRPOConfig.minibatches
    grpo_epochs: int = GRPOConfig.ppo_epochs
    warmup: int = 2  # untimed calls before each item (allocator, thread pool, compile)
    repeats: int = 7  # timed calls per item; the median is reported
    slow_repeats: int = 3  # timed calls of the slow items (RL iterations, CPU bf16, no-cache generation)
    peak_n: int = 1024  # matmul size of the peak measurement (8192 on CUDA)


# the peer runs' sizes (../shared/peers/README.md): 16 x 128 SFT, 16 pairs x (32+32), PPO 16 x 32 + 32 new tokens with
# 1 epoch of 1 minibatch, GRPO 8 prompts x 2, generation 16 x 32 + 128 new tokens (with and without the cache)
PEERS = dict(sft_batch=16, pairs=16, ragged=False, gen_new_nocache=128, ppo_batch=16, ppo_minibatches=1, ppo_epochs=1,
             rl_new=32, grpo_prompts=8, grpo_group=2, grpo_minibatches=1, grpo_epochs=1)
QUICK = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, seq_len=32, batch_size=4, sft_batch=4, pairs=4,
             prompt_len=8, response_len=8, gen_batch=4, gen_new=8, gen_new_nocache=4, ppo_batch=4, ppo_minibatches=2,
             ppo_epochs=1, rl_new=8, grpo_prompts=2, grpo_group=2, grpo_minibatches=1, grpo_epochs=1, warmup=1,
             repeats=2, slow_repeats=1, peak_n=256)
# TRL 1.16.0 (PPO: 1.12.0) on the same kind of 2-core machine, fp32, from ../shared/peers/trl-results.json; "raw" is
# the HF GPT-2 in a plain PyTorch loop, the peer of our pretraining step. (rate, unit) in the units of our rows.
TRL = {"pretrain fp32": (9746.1, "tok/s", "HF GPT-2, plain loop"), "sft": (8458.9, "tok/s", "SFTTrainer"),
       "rm": (74.2, "pairs/s", "RewardTrainer"), "dpo": (36.5, "pairs/s", "DPOTrainer"),
       "ppo": (13.9, "rollouts/s", "PPOTrainer 1.12"), "grpo": (43.5, "compl/s", "GRPOTrainer"),
       "generate cache sampled": (2459.2, "new tok/s", "HF generate"),
       "generate no-cache sampled": (254.4, "new tok/s", "HF generate")}
# dense bf16 tensor-core peaks (TFLOP/s, vendor data sheets); the first name that occurs in the device name wins
NOMINAL_BF16_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("A100", 312),
                       ("L40S", 362), ("L4", 121), ("RTX 4090", 165), ("RTX 3090", 71), ("A10", 125)]


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- timing and memory

def clock(device) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()  # CUDA calls return before the kernels finish
    return time.perf_counter()


def measure(step, warmup: int, repeats: int, device: str):
    """Median seconds of step() over `repeats` calls after `warmup` untimed ones. step() may return a dict of
    {part: seconds} splitting its own time; each part's median comes back too. Also: every time, and the warm-up."""
    t0 = clock(device)
    for _ in range(warmup):
        step()
    warm_s, times, parts = clock(device) - t0, [], {}
    for _ in range(repeats):
        t = clock(device)
        split = step() or {}
        times.append(clock(device) - t)
        for k, v in split.items():
            parts.setdefault(k, []).append(v)
    return statistics.median(times), times, {k: statistics.median(v) for k, v in parts.items()}, warm_s


@contextmanager
def time_calls(module, name: str, parts: dict, device: str):
    """Add the time of every call of module.name to parts[name], leaving the code that calls it unchanged (how the
    rollout's generation is split from its scoring forwards inside rl.rollout)."""
    fn = getattr(module, name)

    def timed(*args, **kwargs):
        t = clock(device)
        out = fn(*args, **kwargs)
        parts[name] = parts.get(name, 0.0) + clock(device) - t
        return out
    with mock.patch.object(module, name, timed):
        yield


def peak_memory_mb(device: str) -> float:
    """CUDA: the largest allocation since the item started. CPU: the process's peak RSS so far (it never drops)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource  # POSIX only
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def probe() -> float:
    """The peer runs' machine-speed probe: GFLOP/s of 10 fp32 512x512 matmuls, median of 7 (same numbers, comparable)."""
    x, y = torch.randn(512, 512), torch.randn(512, 512)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(10):
            x @ y
        times.append(time.perf_counter() - t)
    return 10 * 2 * 512 ** 3 / statistics.median(times) / 1e9


def matmul_peak(n: int, dtype, device: str, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul: the most this machine gave us, so MFU is never flattered by a slow sample.
    Each sample runs enough matmuls to last ~0.1 s, so timer resolution and launch overhead do not count."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = clock(device)
    a @ b
    k = max(1, int(0.1 / max(clock(device) - t, 1e-6)))
    best = 0.0
    for _ in range(repeats):
        t = clock(device)
        for _ in range(k):
            a @ b
        best = max(best, 2 * n ** 3 * k / (clock(device) - t))
    return best


# ---------------------------------------------------------------------------------------------- models and data

def new_model(c: BenchConfig, device, seed=0, block_size=None, vocab_size=None, n_layer=None, n_head=None,
              n_embd=None) -> GPT:
    torch.manual_seed(seed)
    block = block_size or max(c.seq_len, c.prompt_len + max(c.response_len, c.gen_new, c.rl_new))
    cfg = GPTConfig(block, vocab_size or c.vocab_size, n_layer or c.n_layer, n_head or c.n_head, n_embd or c.n_embd)
    return GPT(cfg).to(device)


def random_seqs(c: BenchConfig, n: int, length: int, g, ragged=None) -> list[list[int]]:
    """n random token lists of `length` tokens, or of [length/2, length] tokens when ragged."""
    lo = length // 2 if (c.ragged if ragged is None else ragged) else length
    lengths = torch.randint(max(1, lo), length + 1, (n,), generator=g).tolist()
    return [torch.randint(1, c.vocab_size, (L,), generator=g).tolist() for L in lengths]


def random_pairs(c: BenchConfig, g):
    """(prompt, chosen, rejected) token lists, the layout tokenize_pref produces."""
    return list(zip(random_seqs(c, c.pairs, c.prompt_len, g), random_seqs(c, c.pairs, c.response_len, g),
                    random_seqs(c, c.pairs, c.response_len, g)))


def optimizer_step(model, optimizer, loss, grad_clip: float = 1.0) -> float:
    """backward -> clip -> step -> zero_grad, every stage's update order; .item() syncs as the stages' logging does."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# ---------------------------------------------------------------------------------------------- the items

@dataclass
class Bench:
    cfg: BenchConfig
    device: str
    peak: float  # FLOP/s that MFU divides by
    peers: bool
    rows: list

    def item(self, key, step, units: float, unit: str, slow=False, tokens=None, flops_per_token=None, note=""):
        """Time step() and add a row: rate = units per second, tok/s from `tokens` real tokens per call."""
        log(f"{key} ...")
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        c = self.cfg
        sec, times, parts, warm_s = measure(step, c.warmup, c.slow_repeats if slow else c.repeats, self.device)
        tok_s = tokens / sec if tokens else None
        row = {"item": key, "ms": 1000 * sec, "rate": units / sec, "unit": unit, "tok_s": tok_s,
               "mfu": flops_per_token * tok_s / self.peak if flops_per_token else None,
               "split_ms": {k: 1000 * v for k, v in parts.items()}, "times_ms": [1000 * t for t in times],
               "warmup_s": warm_s, "peak_mem_mb": peak_memory_mb(self.device), "note": note}
        if self.peers and key in TRL:
            rate, trl_unit, what = TRL[key]
            row["trl"] = {"rate": rate, "unit": trl_unit, "what": what, "speedup": row["rate"] / rate}
        self.rows.append(row)


def bench_pretrain(b: Bench, key, model, batch: int, T: int, dtype: str, compile=False, slow=False, note=""):
    """train_pretrain's step: next-token cross-entropy under autocast, AdamW with its defaults."""
    pc = PretrainConfig
    optimizer = common.make_optimizer(model, pc.lr, pc.weight_decay, device=b.device)
    forward = torch.compile(model) if compile else model
    xy = torch.randint(0, model.config.vocab_size, (batch, T + 1), device=b.device)
    x, y = xy[:, :-1], xy[:, 1:]

    def step():
        with common.autocast(b.device, dtype):
            loss = F.cross_entropy(forward(x).float().flatten(0, 1), y.flatten())
        optimizer_step(model, optimizer, loss, pc.grad_clip)
    b.item(key, step, x.numel(), "tok/s", slow, x.numel(), model.flops_per_token(T), note)


def bench_pretrain_all(b: Bench, args):
    c, cuda = b.cfg, b.device.startswith("cuda")
    variants = [("fp32", "float32", False), ("bf16 autocast", "bfloat16", False)]
    variants += [("fp32 compiled", "float32", True), ("bf16 compiled", "bfloat16", True)] if args.compile else []
    for name, dtype, comp in variants:
        slow = dtype == "bfloat16" and not cuda  # no native bf16 matmul on most CPUs: tens of times slower
        bench_pretrain(b, f"pretrain {name}", new_model(c, b.device, block_size=c.seq_len), c.batch_size, c.seq_len,
                       dtype, comp, slow)
    if args.char:  # nanoGPT reports 13-18k tokens/s on these machines at this size (char-level, vocab 65)
        bench_pretrain(b, "pretrain char (nanoGPT size)", new_model(c, b.device, block_size=128, vocab_size=65),
                       16, 128, "float32", note="nanoGPT: 13-18k tok/s here")
    if cuda and not args.quick:  # GPT-2 124M: 12 layers, 12 heads, 768 wide, 1024 context, GPT-2's vocabulary
        for name, dtype, comp in variants:
            gpt2 = new_model(c, b.device, block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
            bench_pretrain(b, f"pretrain GPT-2 124M {name}", gpt2, 8, 1024, dtype, comp)


def bench_generate(b: Bench, args):
    c = b.cfg
    model = new_model(c, b.device).eval()
    prompts = random_seqs(c, c.gen_batch, c.prompt_len, torch.Generator().manual_seed(1), ragged=False)
    for key, temperature, cache, new in [("generate cache greedy", 0.0, True, c.gen_new),
                                         ("generate cache sampled", 1.0, True, c.gen_new),
                                         ("generate no-cache sampled", 1.0, False, c.gen_new_nocache)]:
        def step():
            tokens, mask, P = generate(model, prompts, new, END, PAD, temperature, use_cache=cache)
            assert mask[:, P:].sum() == len(prompts) * new, "every row should generate all its new tokens"
        b.item(key, step, len(prompts) * new, "new tok/s", slow=not cache, note=f"{len(prompts)} x {new} new")


def bench_sft(b: Bench, args):
    """train_sft's step: collate, sft_loss over the labelled tokens (here every token, like TRL's 'text' SFT)."""
    c, sc = b.cfg, SFTConfig
    model = new_model(c, b.device)
    optimizer = common.make_optimizer(model, sc.lr, sc.weight_decay, device=b.device)
    examples = [(s, s) for s in random_seqs(c, c.sft_batch, c.seq_len, torch.Generator().manual_seed(2))]
    n_real = sum(len(s) for s, _ in examples)

    def step():
        tokens, labels, mask = collate(examples, PAD, b.device)
        with common.autocast(b.device, sc.dtype):
            loss = sft_loss(model(tokens, pad_mask=mask), labels, n_real - len(examples))  # labels shift by one
        optimizer_step(model, optimizer, loss, sc.grad_clip)
    b.item("sft", step, n_real, "tok/s", tokens=n_real, flops_per_token=model.flops_per_token(c.seq_len))


def bench_rm(b: Bench, args):
    """train_rm's step: chosen and rejected in one forward, Bradley-Terry loss."""
    c, rc = b.cfg, RMConfig
    model = new_model(c, b.device).add_scalar_head("reward")
    optimizer = common.make_optimizer(model, rc.lr, rc.weight_decay, device=b.device)
    pairs = random_pairs(c, torch.Generator().manual_seed(3))

    def step():
        loss, _ = bt_loss(*pair_rewards(model, pairs, PAD, b.device))
        optimizer_step(model, optimizer, loss, rc.grad_clip)
    b.item("rm", step, len(pairs), "pairs/s", tokens=sum(2 * len(p) + len(ch) + len(r) for p, ch, r in pairs))


def bench_dpo(b: Bench, args):
    """train_dpo's step: the frozen reference's log-probs (no grad), then the policy's, one concatenated forward each."""
    c, dc = b.cfg, DPOConfig
    policy = new_model(c, b.device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = common.make_optimizer(policy, dc.lr, 0.0, device=b.device)
    pairs = random_pairs(c, torch.Generator().manual_seed(4))

    def step():
        t = clock(b.device)
        with torch.no_grad():
            ref_chosen, ref_rejected = concatenated_logps(ref, pairs, PAD, b.device)
        t_ref = clock(b.device) - t
        losses, _, _ = dpo_loss(*concatenated_logps(policy, pairs, PAD, b.device), ref_chosen, ref_rejected, dc.beta)
        optimizer_step(policy, optimizer, losses.mean(), dc.grad_clip)
        return {"reference": t_ref}
    b.item("dpo", step, len(pairs), "pairs/s", tokens=sum(2 * len(p) + len(ch) + len(r) for p, ch, r in pairs))


def rl_models(c: BenchConfig, device):
    """Policy, its frozen copy as the reference, and a separate reward model, as train_ppo / train_grpo build them."""
    policy = new_model(c, device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = new_model(c, device, seed=1).add_scalar_head("reward").eval().requires_grad_(False)
    return policy, ref, rm


def rl_iteration(b: Bench, rollout_kwargs: dict, rm, update):
    """One RL iteration as a timed step, split into generation, scoring (policy log-probs and values, reference and
    reward forwards) and update (advantages and the clipped updates)."""
    parts = {}

    def step():
        parts.clear()
        t0 = clock(b.device)
        with time_calls(rl, "generate", parts, b.device):
            ro = rollout(**rollout_kwargs)
        scores = score_last_token(rm, ro.tokens, ro.pad_mask)
        t1 = clock(b.device)
        update(ro, scores)
        return {"generate": parts["generate"], "score": t1 - t0 - parts["generate"], "update": clock(b.device) - t1}
    return step


def bench_ppo(b: Bench, args):
    c = b.cfg
    cfg = PPOConfig(batch_size=c.ppo_batch, minibatches=c.ppo_minibatches, ppo_epochs=c.ppo_epochs,
                    max_new_tokens=c.rl_new, iterations=c.warmup + c.slow_repeats)
    policy, ref, rm = rl_models(c, b.device)
    policy.add_scalar_head("zero")  # the value head on the policy's trunk, as train_ppo adds it
    optimizer = common.make_optimizer(policy, cfg.lr, 0.0, eps=1e-5, device=b.device)
    prompts = random_seqs(c, cfg.batch_size, c.prompt_len, torch.Generator().manual_seed(5))
    generator = torch.Generator(device=b.device).manual_seed(0)
    d, it = common.Dist(device=b.device), [0]

    def update(ro, scores):
        advantages, returns, _ = advantages_and_returns(ro, scores, cfg.kl_coef, cfg)
        ppo_update(policy, optimizer, ro, advantages, returns, cfg, it[0] % cfg.iterations, d)
        it[0] += 1
    kwargs = dict(policy=policy, ref=ref, prompts=prompts, end_id=END, pad_id=PAD, max_new_tokens=cfg.max_new_tokens,
                  temperature=cfg.temperature, generator=generator, with_values=True)
    b.item("ppo", rl_iteration(b, kwargs, rm, update), cfg.batch_size, "rollouts/s", slow=True,
           note=f"{cfg.batch_size} x {cfg.max_new_tokens} new, {cfg.ppo_epochs} ep x {cfg.minibatches} mb")


def grpo_update(policy, optimizer, ro, scores, cfg: GRPOConfig):
    """train_grpo.train's steps 2-3 (k1 penalty in the reward, token-normalised loss), which it runs inline: keep this
    in step with it. Group advantages, then clipped updates over minibatches of whole groups."""
    n, G, mask = cfg.prompts_per_iter, cfg.group_size, ro.response_mask
    rewards = scores - cfg.kl_coef * masked_sum(ro.logprobs - ro.ref_logprobs, mask, 1)
    advantages = group_advantages(rewards.view(n, G), cfg.estimator, cfg.scale_by_std).view(-1)
    policy.train()
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n)
        for k in range(cfg.minibatches):
            groups = perm[k * n // cfg.minibatches:(k + 1) * n // cfg.minibatches]
            mb = (groups[:, None] * G + torch.arange(G)).view(-1).to(mask.device)
            with common.autocast(str(mask.device), cfg.dtype):
                logits = policy(ro.tokens[mb], pad_mask=ro.pad_mask[mb])
            logprobs = response_logprobs(logits, ro.tokens[mb], ro.P, cfg.temperature)
            loss, _ = clipped_policy_loss(logprobs, ro.logprobs[mb], advantages[mb], mask[mb], cfg.cliprange,
                                          ("token", mask[mb].sum().clamp(min=1)))
            optimizer_step(policy, optimizer, loss, cfg.grad_clip)
            masked_mean(entropy_from_logits(logits[:, ro.P - 1:-1].detach()), mask[mb]).item()  # logged by train


def bench_grpo(b: Bench, args):
    c = b.cfg
    cfg = GRPOConfig(prompts_per_iter=c.grpo_prompts, group_size=c.grpo_group, minibatches=c.grpo_minibatches,
                     ppo_epochs=c.grpo_epochs, max_new_tokens=c.rl_new)
    policy, ref, rm = rl_models(c, b.device)
    optimizer = common.make_optimizer(policy, cfg.lr, 0.0, eps=1e-5, device=b.device)
    prompts = [p for p in random_seqs(c, cfg.prompts_per_iter, c.prompt_len, torch.Generator().manual_seed(6))
               for _ in range(cfg.group_size)]  # each prompt G times in a row: one group
    kwargs = dict(policy=policy, ref=ref, prompts=prompts, end_id=END, pad_id=PAD, max_new_tokens=cfg.max_new_tokens,
                  temperature=cfg.temperature, generator=torch.Generator(device=b.device).manual_seed(0))
    b.item("grpo", rl_iteration(b, kwargs, rm, lambda ro, scores: grpo_update(policy, optimizer, ro, scores, cfg)),
           len(prompts), "compl/s", slow=True, note=f"{cfg.prompts_per_iter} x {cfg.group_size} x "
           f"{cfg.max_new_tokens} new, {cfg.ppo_epochs} ep x {cfg.minibatches} mb")


SECTIONS = {"pretrain": bench_pretrain_all, "generate": bench_generate, "sft": bench_sft, "rm": bench_rm,
            "dpo": bench_dpo, "ppo": bench_ppo, "grpo": bench_grpo}


# ---------------------------------------------------------------------------------------------- run and report

def machine_peaks(c: BenchConfig, device: str) -> dict:
    cuda = device.startswith("cuda")
    n = 8192 if cuda else c.peak_n
    peaks = {"fp32_gflops": matmul_peak(n, torch.float32, device) / 1e9,
             # CPUs without AVX512-BF16/AMX emulate bf16 matmuls ~50x slower: a smaller matrix keeps this short
             "bf16_gflops": matmul_peak(n if cuda else min(n, 512), torch.bfloat16, device) / 1e9}
    if cuda:
        name = torch.cuda.get_device_name(0)
        peaks["nominal_bf16_tflops"] = next((v for k, v in NOMINAL_BF16_TFLOPS if k in name), None)
    return peaks


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run(args) -> dict:
    c = BenchConfig()
    c = replace(c, **PEERS) if args.peers else c
    c = replace(c, **QUICK) if args.quick else c
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    t0, probe_before = time.time(), probe()
    peaks = machine_peaks(c, device)
    nominal = peaks.get("nominal_bf16_tflops")
    # MFU denominators: the measured fp32 peak on CPU; on CUDA the nominal bf16 peak (else the measured bf16 one)
    peak = (nominal * 1e12 if nominal else peaks["bf16_gflops"] * 1e9) if device.startswith("cuda") else \
        peaks["fp32_gflops"] * 1e9
    b = Bench(c, device, peak, args.peers, [])
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    for name in only:
        SECTIONS[name](b, args)
    return {"machine": torch.cuda.get_device_name(0) if device.startswith("cuda") else cpu_name(),
            "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "argv": sys.argv[1:] if args.argv is None else args.argv,
            "preset": "quick" if args.quick else "peers" if args.peers else "tiny", "sizes": asdict(c),
            "peak": peaks, "mfu_peak_gflops": peak / 1e9, "probe_gflops_before_after": [probe_before, probe()],
            "rows": b.rows, "wall_s": time.time() - t0}


def fmt(x: float) -> str:
    return f"{x / 1000:.2f}k" if x >= 1e4 else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def print_table(r: dict):
    p, (before, after) = r["peak"], r["probe_gflops_before_after"]
    nominal = f", nominal bf16 {p['nominal_bf16_tflops']} TFLOP/s" if p.get("nominal_bf16_tflops") else ""
    print(f"nanoalign bench | {r['machine']} | {r['device']}, {r['threads']} threads | torch {r['torch']} | "
          f"preset {r['preset']} | {r['wall_s']:.0f} s\nprobe (fp32 512x512 matmuls) before/after: {before:.0f} / "
          f"{after:.0f} GFLOP/s | matmul peak fp32 {p['fp32_gflops']:.0f}, bf16 {p['bf16_gflops']:.1f} GFLOP/s"
          f"{nominal} | MFU against {r['mfu_peak_gflops']:.0f} GFLOP/s")
    head = f"{'item':<28} {'ms':>8} {'throughput':>19} {'tok/s':>7} {'MFU':>6} {'RSS MB' if r['device'] == 'cpu' else 'MB':>6}"
    head += "  " + (f"{'TRL peer (ours/TRL)':<28} " if any("trl" in row for row in r["rows"]) else "") + "split ms / note"
    print(head + "\n" + "-" * len(head))
    for row in r["rows"]:
        trl = row.get("trl")
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else ""
        cells = [f"{row['item']:<28} {row['ms']:>8.1f} {fmt(row['rate']) + ' ' + row['unit']:>19}",
                 f"{fmt(row['tok_s']) if row['tok_s'] else '':>7} {mfu:>6} {row['peak_mem_mb']:>6.0f} "]
        if any("trl" in x for x in r["rows"]):
            cells.append(f"{fmt(trl['rate'])} {trl['unit']} ({trl['speedup']:.2f}x)" if trl else "")
            cells[-1] = f"{cells[-1]:<28}"
        cells.append("; ".join(x for x in (", ".join(f"{k} {v:.0f}" for k, v in row["split_ms"].items()),
                                           row["note"]) if x))
        print(" ".join(cells))


def main(argv=None):
    # a plain argparse (not common.parse_config): these are switches, `--json` rather than `--json true`
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the table")
    parser.add_argument("--quick", action="store_true", help="micro sizes and 2 repeats: seconds (the smoke test)")
    parser.add_argument("--peers", action="store_true", help="the TRL peer runs' sizes, TRL's figures beside ours")
    parser.add_argument("--compile", action="store_true", help="add torch.compile variants of pretraining")
    parser.add_argument("--char", action="store_true", help="add pretraining at nanoGPT's char-level size")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    args.argv = argv
    unknown = set(filter(None, args.only.split(","))) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}")
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return result


if __name__ == "__main__":
    main()
