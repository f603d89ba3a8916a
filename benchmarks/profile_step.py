"""
Where a pretraining step's time goes, by kind of work: the matmuls (the MFU counts only them and
the attention products) against everything around them. One step = bench.py's pretraining step
(forward, next-token cross-entropy, backward, clipping, AdamW), fp32 on the CPU.

    python benchmarks/profile_step.py                      # bench's sizes: 4L/4H/128d, vocab 512
    python benchmarks/profile_step.py --batch 16 --seq 128 --n_embd 256

Prints the step time, MFU against the matmul peak measured in the same run, and the share of
the profiled CPU time of each kind of operation (self time of aten operators, so nothing is
counted twice).
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, machine  # noqa: E402
from nanoalign.benchkit import train_step  # noqa: E402
from nanoalign.model import GPT, GPTConfig  # noqa: E402

# aten operator name fragments -> kind of work, first match wins
KINDS = [("matmul", ("addmm", "::mm", "bmm", "matmul")),
         ("attention", ("attention", "_flash", "sdpa")),
         ("cross-entropy / softmax", ("log_softmax", "nll_loss", "softmax")),
         ("layernorm", ("layer_norm",)),
         ("gelu", ("gelu",)),
         ("embedding", ("embedding",)),
         ("gradient clipping (norms)", ("norm", "clamp")),
         ("optimizer (AdamW)", ("adam", "_foreach")),
         ("copies and reductions", ("copy_", "sum", "add", "mul", "fill_", "zero_", "cat"))]


def kind_of(name: str) -> str:
    return next((k for k, parts in KINDS if any(p in name for p in parts)), "other")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is kept)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=args.seq, vocab_size=args.vocab, n_layer=args.n_layer,
                    n_head=max(1, args.n_embd // 32), n_embd=args.n_embd)
    model = GPT(cfg)
    optimizer = common.make_optimizer(model, 3e-3, 0.1)
    xy = torch.randint(0, args.vocab, (args.batch, args.seq + 1))

    def step():
        logits = model(xy[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), xy[:, 1:].flatten())  # (B*T, V), (B*T,)
        train_step(model, optimizer, loss, 1.0)

    for _ in range(3):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    dt = sorted(times)[len(times) // 2]
    peak = machine.matmul_gflops(1024)
    flops = model.flops_per_token(args.seq) * args.batch * args.seq
    print(f"{machine.machine_name('cpu')}, {torch.get_num_threads()} threads; {args.n_layer}L "
          f"{args.n_embd}d vocab {args.vocab}, {args.batch} x {args.seq}: step {dt * 1e3:.1f} ms, "
          f"{flops / dt / 1e9:.1f} GFLOP/s, MFU {flops / dt / 1e9 / peak:.0%} of the measured "
          f"fp32 matmul peak {peak:.0f} GFLOP/s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    shares = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            shares[kind_of(e.key)] = shares.get(kind_of(e.key), 0) + e.self_cpu_time_total
    total = sum(shares.values())
    for kind, t in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:28s} {t / total:6.1%}")


if __name__ == "__main__":
    main()
