"""
Generation speed of the working tree against another revision, in one process, alternating
A, B, A, B so that both see the same machine (these hosts are noisy: never divide by a figure
from another run).

    python benchmarks/generate_ab.py --base HEAD~1          # peer sizes: 4L/4H/128d, vocab 512
    python benchmarks/generate_ab.py --base HEAD~1 --gelu none --vocab 517

The base revision's nanoalign/ is extracted with `git archive` into a temporary folder and
imported as `nanoalign_base`. Both models get the same weights; every row generates all its
new tokens (the end token is never sampled), from prompts of --prompt_len tokens.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def import_revision(rev: str, into: str):
    """nanoalign at `rev` as the package nanoalign_base (its own imports renamed to match)."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "nanoalign"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    base = os.path.join(into, "nanoalign_base")
    os.rename(os.path.join(into, "nanoalign"), base)
    for name in os.listdir(base):
        if name.endswith(".py"):
            path = os.path.join(base, name)
            with open(path) as f:
                text = re.sub(r"\bnanoalign\b(?=[ .])", "nanoalign_base", f.read())
            with open(path, "w") as f:
                f.write(text)
    sys.path.insert(0, into)
    import nanoalign_base.generate
    import nanoalign_base.model
    return nanoalign_base.model, nanoalign_base.generate


def tokens_per_second(generate, model, args, batch, temperature, cache=True, new=None):
    new = new or args.new
    prompts = [[(7 * i + j) % (args.vocab - 8) for j in range(args.prompt_len)]
               for i in range(batch)]
    g = torch.Generator().manual_seed(0)
    pad = args.vocab - 1
    generate(model, prompts, 4, -1, pad, temperature, generator=g, use_cache=cache)  # warm up
    best = float("inf")
    for _ in range(args.repeats):
        t = args.clock()
        generate(model, prompts, new, -1, pad, temperature, generator=g, use_cache=cache)
        best = min(best, args.clock() - t)
    return batch * new / best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--base", default="HEAD", help="the git revision to compare against")
    p.add_argument("--batches", default="16,64", help="prompts per generate() call")
    p.add_argument("--new", type=int, default=128, help="new tokens per call")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--gelu", default="tanh", help="tanh (GPT-2's, the peers') or none")
    p.add_argument("--kv_batches", default="16", help="batches of the KV-cache ratio ('' for none)")
    p.add_argument("--rounds", type=int, default=2, help="A, B alternations per item")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per turn (best is kept)")
    p.add_argument("--cpu_time", action="store_true",
                   help="time by the process's CPU time, not the wall clock: steadier on a busy host "
                        "with --threads 1 (with more threads it counts their waiting too)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.clock = time.process_time if args.cpu_time else time.perf_counter
    from nanoalign import generate as gen_b
    from nanoalign import model as model_b
    with tempfile.TemporaryDirectory() as tmp:
        model_a, gen_a = import_revision(args.base, tmp)
        sizes = dict(n_layer=4, n_head=4, n_embd=128, vocab_size=args.vocab, gelu=args.gelu,
                     block_size=args.prompt_len + args.new)
        torch.manual_seed(0)
        a = model_a.GPT(model_a.GPTConfig(**sizes)).eval()
        b = model_b.GPT(model_b.GPTConfig(**sizes)).eval()
        b.load_state_dict(a.state_dict())
        clock = "CPU time" if args.cpu_time else "wall clock"
        print(f"threads {torch.get_num_threads()}, {clock}; {args.base} (A) vs the working tree "
              f"(B); {args.prompt_len} + {args.new} new tokens; new tokens/s, best turn of "
              f"{args.rounds}; B/A: the lowest and highest ratio of one round's A and B turns")
        for batch in map(int, args.batches.split(",")):
            for temperature in (1.0, 0.0):
                fa, fb = [], []
                for _ in range(args.rounds):
                    fa.append(tokens_per_second(gen_a.generate, a, args, batch, temperature))
                    fb.append(tokens_per_second(gen_b.generate, b, args, batch, temperature))
                ratios = sorted(y / x for x, y in zip(fa, fb))
                print(f"batch {batch:3d} temperature {temperature}: A {max(fa):8,.0f}  "
                      f"B {max(fb):8,.0f}  B/A {max(fb) / max(fa):.2f} "
                      f"({ratios[0]:.2f}-{ratios[-1]:.2f})")
        # the KV cache against recomputing the prefix, each revision alternately
        for batch in [int(x) for x in args.kv_batches.split(",") if x]:
            kv = {"A": [], "B": []}
            for _ in range(args.rounds):
                for name, gen, model in (("A", gen_a, a), ("B", gen_b, b)):
                    cached = tokens_per_second(gen.generate, model, args, batch, 1.0)
                    plain = tokens_per_second(gen.generate, model, args, batch, 1.0, cache=False)
                    kv[name].append(cached / plain)
            print(f"KV cache vs none, batch {batch}, sampled: " + "  ".join(
                f"{k} {min(v):.1f}-{max(v):.1f}x" for k, v in kv.items()))

if __name__ == "__main__":
    main()
