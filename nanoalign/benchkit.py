"""
How bench.py measures: a timer for repeated calls, the rows and the table of timed items (with MFU
against the machine's peak), the fixtures it times them on (fresh models of its sizes, a
BenchConfig, and random tokens), and the side-by-side run with the TRL peer script.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from nanoalign.common import optimizer_step
from nanoalign.machine import clock, machine_name, matmul_gflops, peak_memory_mb, peaks, probe
from nanoalign.model import GPT, GPTConfig


def time_calls(step, warmup: int, repeats: int, device: str) -> dict:
    """Time step() after `warmup` untimed calls. step may return {part: seconds}, a split of its
    own time. Returns the median seconds, every call's, the warm-up's, and each part's median."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
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
    return {"sec": statistics.median(times), "times": times, "warmup_s": warmup_s,
            "parts": {k: statistics.median(v) for k, v in parts.items()}}


@dataclass
class Bench:
    cfg: object  # bench.BenchConfig: warmup, repeats, slow_repeats
    device: str
    rows: list

    def item(self, key, step, units, unit, slow=False, tokens=None, flops_per_token=None, note=""):
        """Time step() and add a row: `units` per call -> rate; real `tokens` per call -> tok/s
        and, with the training FLOPs per token, the GFLOP/s that run() turns into MFU."""
        c = self.cfg
        print(f"[bench] {key} ...", file=sys.stderr, flush=True)
        t = time_calls(step, c.warmup, c.slow_repeats if slow else c.repeats, self.device)
        tok_s = tokens / t["sec"] if tokens else None
        gflops = flops_per_token * tok_s / 1e9 if flops_per_token else None
        self.rows.append({"item": key, "ms": 1000 * t["sec"], "rate": units / t["sec"],
                          "unit": unit, "tok_s": tok_s, "gflops": gflops, "note": note,
                          "split_ms": {k: 1000 * v for k, v in t["parts"].items()},
                          "times_ms": [1000 * x for x in t["times"]], "warmup_s": t["warmup_s"],
                          "peak_mem_mb": peak_memory_mb(self.device)})


def measure(bench: Bench, items, peak_n: int) -> dict:
    """Run each item (a function of the Bench) between two probes of the machine's speed, then set
    every row's MFU against the peak: the best fp32 matmul measured here on a CPU, the card's
    nominal bf16 peak on CUDA (the measured bf16 one if the card is unknown)."""
    device, cuda = bench.device, bench.device.startswith("cuda")
    t0, probe_before, measured = time.time(), probe(), peaks(device, peak_n)
    for item in items:
        item(bench)
    if not cuda:  # the machine's speed drifts: the peak is the best of before and after
        measured["fp32_gflops"] = max(measured["fp32_gflops"], matmul_gflops(peak_n))
    nominal = measured.get("nominal_bf16_tflops")
    peak = 1000 * nominal if nominal else measured["bf16_gflops" if cuda else "fp32_gflops"]
    for row in bench.rows:
        row["mfu"] = row["gflops"] / peak if row["gflops"] else None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"machine": machine_name(device), "device": device, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "peak": measured,
            "mfu_peak_gflops": peak, "probe_gflops_before_after": [probe_before, probe()],
            "load_average_after": load, "wall_s": time.time() - t0, "rows": bench.rows}


def fmt(x) -> str:
    if x is None:
        return ""
    return f"{x / 1000:.2f}k" if x >= 1e4 else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def print_table(r: dict):
    p, (before, after) = r["peak"], r["probe_gflops_before_after"]
    nominal = p.get("nominal_bf16_tflops")
    nominal = f", nominal bf16 {nominal} TFLOP/s" if nominal else ""
    load = (r["load_average_after"] or [0])[0]
    print(f"{r['command']} | {r['machine']} ({r['device']}) | torch {r['torch']} | "
          f"{r['wall_s']:.0f} s\nprobe before/after {before:.0f} / {after:.0f} GFLOP/s | matmul "
          f"peak fp32 {p['fp32_gflops']:.0f}, bf16 {p['bf16_gflops']:.1f} GFLOP/s{nominal} | MFU "
          f"against {r['mfu_peak_gflops']:,.0f} GFLOP/s | load average {load:.1f}")
    head = f"{'item':<26}{'ms':>9}{'throughput':>20}{'tok/s':>8}{'MFU':>7}{'mem MB':>8}  "
    print(head + "split ms; note\n" + "-" * (len(head) + 14))
    for x in r["rows"]:
        split = ", ".join(f"{k} {v:.0f}" for k, v in x["split_ms"].items())
        mfu, rate = f"{100 * x['mfu']:.1f}%" if x["mfu"] else "", fmt(x["rate"]) + " " + x["unit"]
        print(f"{x['item']:<26}{x['ms']:>9.1f}{rate:>20}{fmt(x['tok_s']):>8}{mfu:>7}"
              f"{x['peak_mem_mb']:>8.0f}  " + "; ".join(s for s in (split, x["note"]) if s))


# ----------------------------------------------------------------------------------- fixtures
# What bench.py times its items on: fresh models of its sizes (a BenchConfig), random tokens.

PAD, END = 0, -1  # random tokens are drawn from 1..V-1, so no row ever emits END


def new_model(c, device: str, seed=0, **sizes) -> GPT:
    """A freshly initialised GPT of the bench's sizes; keyword arguments override GPTConfig."""
    torch.manual_seed(seed)
    block = max(c.seq_len, c.prompt_len + max(c.response_len, c.gen_new, c.rl_new))
    cfg = dict(block_size=block, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
               n_embd=c.n_embd, gelu=c.gelu)
    return GPT(GPTConfig(**{**cfg, **sizes})).to(device)


def random_seqs(c, n: int, length: int, seed: int, ragged=None) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo = length // 2 if (c.ragged if ragged is None else ragged) else length
    return [torch.randint(1, c.vocab_size, (int(L),), generator=g).tolist()
            for L in torch.randint(max(1, lo), length + 1, (n,), generator=g)]


def random_pairs(c, seed: int):
    """(prompt, chosen, rejected) token lists as tokenize_pref lays them out; real tokens."""
    pairs = list(zip(*(random_seqs(c, c.pairs, n, seed + k)
                       for k, n in enumerate([c.prompt_len, c.response_len, c.response_len]))))
    return pairs, sum(2 * len(p) + len(ch) + len(r) for p, ch, r in pairs)


def train_step(model, optimizer, loss, grad_clip: float) -> float:
    """backward, then the stages' clip, step and clear; .item() syncs as the stages' logs do."""
    loss.backward()
    optimizer_step(model, optimizer, grad_clip)
    return loss.item()


# ----------------------------------------------------------------------------------- peers
# Shown with --peers when no --peer_python is given: a reference from another run, never a ratio
TRL_REFERENCE = ("TRL 1.16 at these sizes, for reference only (2026-12-03, Intel Xeon with "
                 "AVX512-BF16/AMX, 2 cores; another run, so no ratio): SFT 17.0-19.7k tokens/s, "
                 "RM 176-192 pairs/s, DPO 91-124 pairs/s, GRPO 92-94 completions/s, HF generate "
                 "5.9-6.0k new tokens/s. Ratios: --peer_python PYTHON_WITH_TRL.")


# Each of our rows and the figure of the TRL peer script (trl_bench.py) it sits beside: (our item,
# the script's stage, where the figure is in that stage's results). "raw" is the same HF GPT-2 in
# a plain PyTorch loop, generation is HF `generate`: no TRL in either, the model code alone.
PEER_FIGURES = [("pretrain fp32", "raw", ["tokens_per_s"]), ("sft", "sft", ["tokens_per_s"]),
                ("rm", "rm", ["pairs_per_s"]), ("dpo", "dpo", ["pairs_per_s"]),
                ("grpo", "grpo", ["completions_per_s"]), ("ppo", "ppo", ["rollouts_per_s"]),
                ("generate cache sampled", "gen", ["use_cache=True", "new_tokens_per_s"]),
                ("generate no-cache sampled", "gen", ["use_cache=False", "new_tokens_per_s"])]


def run_peer(python: str, script: str, stages: list[str], work: str) -> dict:
    """One process of the peer script over `stages` (at its default sizes, which are bench
    --peers'): {stage: the figures of its run}. Its data and scratch files go under `work`. The
    script takes --stage S..., --results FILE, --data DIR, --work DIR and writes to FILE
    {"stages": {stage: {"runs": [figures, ...]}}}, figures as PEER_FIGURES reads them."""
    results = os.path.join(work, "trl.json")
    if os.path.exists(results):
        os.remove(results)
    cmd = [python, script, "--stage", *stages, "--results", results,
           "--data", os.path.join(work, "data"), "--work", os.path.join(work, "scratch")]
    print(f"[bench] peer: {' '.join(cmd)}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the peer script failed ({python} {script}):\n{done.stderr[-2000:]}")
    with open(results) as f:
        return {stage: entry["runs"][-1] for stage, entry in json.load(f)["stages"].items()}


def peer_figure(runs: dict, stage: str, path: list[str]):
    value = runs.get(stage)
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def side_by_side(ours, peer, rounds: int) -> dict:
    """ours() -> a bench result, peer() -> run_peer's figures, alternated (ours first in even
    rounds, the peer first in odd ones) so that both meet the same drifts of the machine. Every
    ratio is ours / the peer's within one round: never across rounds or runs."""
    rounds_seen = []
    for r in range(rounds):
        if r % 2 == 0:
            mine, theirs = ours(), peer()
        else:
            theirs = peer()
            mine = ours()
        rates = {row["item"]: row["rate"] for row in mine["rows"]}
        rounds_seen.append({"ours": mine, "trl": theirs, "figures": [
            {"item": item, "ours": rates[item], "trl": peer_figure(theirs, stage, path)}
            for item, stage, path in PEER_FIGURES
            if item in rates and peer_figure(theirs, stage, path)]})
    table = []
    for i, fig in enumerate(rounds_seen[0]["figures"]):
        each = [rs["figures"][i] for rs in rounds_seen]
        table.append({"item": fig["item"], "ours": [f["ours"] for f in each],
                      "trl": [f["trl"] for f in each],
                      "ratio": [f["ours"] / f["trl"] for f in each]})
    versions = next((run["versions"] for run in rounds_seen[0]["trl"].values()
                     if "versions" in run), {})
    return {"rounds": rounds, "trl_versions": versions, "table": table,
            "ours_last": rounds_seen[-1]["ours"]}


def span(xs: list) -> str:
    return f"{fmt(min(xs))}-{fmt(max(xs))}" if len(xs) > 1 else fmt(xs[0])


def print_side_by_side(r: dict):
    v = r["trl_versions"]
    print(f"\nSide by side, {r['rounds']} rounds alternating (TRL {v.get('trl', '?')}, "
          f"transformers {v.get('transformers', '?')}, each round in its own process); ratio = "
          "ours / TRL's within a round")
    print(f"{'item':<26}{'ours':>16}{'TRL':>16}{'ratio':>14}")
    for x in r["table"]:
        ratio = "-".join(f"{q:.2f}" for q in sorted({min(x["ratio"]), max(x["ratio"])}))
        print(f"{x['item']:<26}{span(x['ours']):>16}{span(x['trl']):>16}{ratio + 'x':>14}")


def peers_side_by_side(args, run, sections) -> dict:
    """bench --peers (run(args)) and the TRL peer script in turns, each TRL round in its own
    process; sections: bench's, in order."""
    if not os.path.exists(args.peer_script):
        raise SystemExit(f"--peer_script {args.peer_script!r}: no such file (--peer_python needs "
                         "the TRL benchmark script: docs/speed.md)")
    args.peers = True
    stages = {"pretrain": "raw", "generate": "gen", "sft": "sft", "rm": "rm", "dpo": "dpo",
              "grpo": "grpo", "ppo": "ppo"}
    wanted = [stages[s] for s in (args.only.split(",") if args.only else sections) if s in stages]
    with tempfile.TemporaryDirectory() as work:
        result = side_by_side(lambda: run(args), lambda: run_peer(
            args.peer_python, args.peer_script, wanted, work), args.rounds)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result["ours_last"])
        print_side_by_side(result)
    return result
