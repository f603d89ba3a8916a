"""
How far a decoding step is from what the hardware allows, at bench's peer sizes (4 layers, 4 heads,
128 wide, vocabulary 512, GPT-2's tanh GELU): where generate()'s time goes, operator by operator,
and the attention of GPT.decode against one plain read of the keys and values it attends to.

    python benchmarks/decode_floor.py                  # batch 16 and 64, torch's default threads
    python benchmarks/decode_floor.py --batches 64 --threads 1

The attention reads the whole cache every step: when it takes little more than a sum over the
same memory, it is bound by memory traffic, and no rearrangement of the arithmetic speeds it up.
"""

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign.generate import generate  # noqa: E402
from nanoalign.model import GPT, GPTConfig  # noqa: E402


def best_us(f, calls=300, turns=5, warmup=20):
    """The best of `turns` means over `calls` calls, after `warmup` untimed calls, in
    microseconds. (benchkit.time_calls times each call alone: too coarse for a 20 us kernel.)"""
    for _ in range(warmup):
        f()
    times = []
    for _ in range(turns):
        t = time.perf_counter()
        for _ in range(calls):
            f()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return min(times)


def attention_against_a_read(batch: int, n_head=4, head_size=32, slots=96, max_len=160):
    """GPT.decode's attention for one layer (one query per row and head over `slots` filled slots
    of the cache) and a sum over the same keys and values: (attention us, read us, MB read)."""
    kv = torch.randn(2, batch, n_head, max_len, head_size)  # the cache's layout
    k, v = kv[:, :, :, :slots].flatten(1, 2)  # (B*nh, S, hs) each
    q = torch.randn(batch * n_head, 1, head_size)
    bias = torch.zeros(batch * n_head, 1, max_len)[:, :, :slots]

    def attention():
        att = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=head_size ** -0.5).softmax(-1)
        return torch.bmm(att, v)
    return best_us(attention), best_us(lambda: (k.sum(), v.sum())), 2 * k.numel() * 4 / 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--batches", default="16,64", help="prompts per generate() call")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--top", type=int, default=8, help="operators listed per batch")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=512, block_size=160,
                          gelu="tanh")).eval()
    print(f"threads {torch.get_num_threads()}; 32 + 128 new tokens, sampled")
    for batch in map(int, args.batches.split(",")):
        prompts = [[(7 * i + j) % 500 for j in range(32)] for i in range(batch)]
        g = torch.Generator().manual_seed(0)

        def run():
            return generate(model, prompts, 128, -1, 511, 1.0, generator=g)
        step_us = best_us(run, calls=1, warmup=2) / 128
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        shares = ", ".join(f"{e.key.replace('aten::', '')} {e.self_cpu_time_total / total:.0%}"
                           for e in ops[:args.top])
        attn, read, mb = attention_against_a_read(batch)
        print(f"batch {batch}: {step_us:,.0f} us a step ({batch / step_us * 1e6:,.0f} new tokens/s)"
              f"\n  profiled self time: {shares}"
              f"\n  one layer's attention over 96 slots: {attn:.0f} us; one read of its keys and "
              f"values ({mb:.1f} MB): {read:.0f} us; {attn / read:.2f}x the read")


if __name__ == "__main__":
    main()
