"""
The GPU check: what no CPU test can show, in one command and one JSON file (~5 minutes on one GPU).

    python -m nanoalign.gpu_check          # on a CUDA machine: out/gpu_check/gpu_check.json
    python -m nanoalign.gpu_check --dry    # the same four parts on the CPU, smallest sizes (CI)

1. tests     the tests marked `cuda`, on the GPU: its logits against the CPU's, the KV cache against
             recomputation, and what bf16 must keep (first PPO/GRPO ratio exactly 1, DPO loss
             exactly log 2 at initialisation)
2. pipeline  the micro pipeline on the GPU in bf16, end to end (every stage, evaluation, report)
3. ddp       every stage under torchrun over NCCL, one rank per GPU. One rank is enough: under
             torchrun the process group always starts, so one GPU runs the code path of many.
             The ranks' weights must agree.
4. speed     pretraining at GPT-2-124M's shape (tokens/s, MFU against the card's bf16 peak, eager
             and compiled), generation at that shape (new tokens/s with the KV cache, greedy and
             sampled, and without it) and a PPO iteration at the gpu preset's sizes, split into
             generate, score and update; peak memory

Each part runs in its own process with a time limit: one failure still leaves the others' figures.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import bench, common, machine, pipeline, record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = "pretrain,sft,rm,ppo,dpo,grpo,rlvr,pretrain_small,distill"
LIMITS_S = {"tests": 90, "pipeline": 120, "ddp": 120, "speed": 170}  # 8.3 minutes in all


def run_part(name: str, cmd: list[str], out: str, env: dict | None = None) -> dict:
    """One part in a subprocess: its output goes to out/<name>.log, its last lines to the JSON."""
    log_path = os.path.join(out, f"{name}.log")
    print(f"[gpu_check] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        try:
            returncode = proc.wait(timeout=LIMITS_S[name])
        except subprocess.TimeoutExpired:
            # SIGTERM first: torchrun then stops its workers, which run in sessions of their own
            # and would otherwise hold the GPU (and maybe an NCCL collective) after a SIGKILL
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            returncode = "timeout"
    seconds = time.time() - t0
    with open(log_path, errors="replace") as f:
        tail = f.read().splitlines()[-15:]
    verdict = "ok" if returncode == 0 else f"FAILED ({returncode})"
    print(f"[gpu_check] {name}: {verdict} in {seconds:.0f} s", flush=True)
    return {"ok": returncode == 0, "returncode": returncode, "seconds": round(seconds, 1),
            "command": " ".join(cmd), "log": log_path, "tail": tail}


def ddp_worker(args):
    """One rank of part 3: every stage of the micro plan, its parents from part 2's run."""
    d = common.init_dist(args.device)
    cleanup, common.cleanup_dist = common.cleanup_dist, lambda: None  # one group for all stages
    cfg = pipeline.PipelineConfig(preset="micro", out=args.micro_dir, stages=args.stages,
                                  device=args.device, dtype=args.dtype)
    sums = {"backend": common.process_group_backend(d.device), "world": d.world}
    for name, module, stage_args in pipeline.stage_plan(cfg, os.path.join(args.micro_dir, "world")):
        stage_args["out_dir"] = os.path.join(args.out, "ddp", name)
        model = module.main([x for k, v in stage_args.items() for x in (f"--{k}", str(v))])
        sums[name] = [float(p.detach().double().sum()) for p in model.parameters()]
        metrics = os.path.join(stage_args["out_dir"], "metrics.jsonl")
        sums[f"{name}_rows"] = len(record.read_metrics(metrics)) if d.master else None
    with open(os.path.join(args.out, f"ddp_rank{d.rank}.json"), "w") as f:
        json.dump(sums, f)
    cleanup()


def ddp_summary(out: str, n_ranks: int, stages: str) -> dict:
    """Did every rank finish, and do their weights agree?"""
    paths = [os.path.join(out, f"ddp_rank{r}.json") for r in range(n_ranks)]
    if not all(os.path.exists(p) for p in paths):
        return {"ranks_agree": False}
    ranks = [record.read_json(p) for p in paths]
    names = stages.split(",")
    rows = {s: ranks[0][f"{s}_rows"] for s in names}
    return {"backend": ranks[0]["backend"], "ranks": n_ranks, "rows_logged": rows,
            "ranks_agree": all(r[s] == ranks[0][s] for r in ranks for s in names),
            "every_stage_trained": min(rows.values()) > 0}


def speed_worker(args):
    """Part 4: bench's own items, at GPT-2-124M's shape and the gpu preset's PPO sizes: bench's
    generation rows (fp32 weights, as the stages sample) at that shape too."""
    cuda = args.device.startswith("cuda")
    gpu = pipeline.PRESETS["gpu"]
    sizes = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=gpu["pretrain"]["vocab_size"],
                 ppo_batch=gpu["ppo"]["batch_size"], rl_minibatches=gpu["ppo"]["minibatches"],
                 warmup=2, repeats=5, slow_repeats=2)
    c = replace(bench.BenchConfig(), **(sizes if cuda else bench.QUICK))
    b = bench.Bench(c, args.device, [])
    peaks = machine.peaks(args.device, c.peak_n)
    nominal = peaks.get("nominal_bf16_tflops")
    peak = 1000 * nominal if nominal else peaks["bf16_gflops"]
    figures = {"peak": peaks, "mfu_peak_gflops": peak, "sizes": asdict(c), "rows": b.rows,
               "errors": {}}

    def pretrain(key, T, vocab, batch, compiled=False):
        model = bench.new_model(c, args.device, block_size=T, vocab_size=vocab)
        bench.bench_pretrain(b, key, model, batch, T, "bfloat16", compiled)

    # GPT-2 124M: 12 layers x 12 heads x 768, 1,024 tokens, its 50,257-token vocabulary
    items = [("pretrain GPT-2 124M shape bf16", lambda k: pretrain(k, 1024, 50257, 16)),
             ("generate", lambda k: bench.bench_generate(b, argparse.Namespace())),
             ("ppo bfloat16", lambda k: bench.bench_ppo(b, argparse.Namespace(), dtype="bfloat16")),
             ("pretrain GPT-2 124M shape bf16 compiled",
              lambda k: pretrain(k, 1024, 50257, 16, compiled=True))]  # last: compiling may fail
    if not cuda:
        micro = lambda k: pretrain(k, c.seq_len, c.vocab_size, c.batch_size)
        items = [("pretrain micro bf16", micro), items[1], items[2]]
    for key, item in items:  # one item's failure (out of memory, no compiler) keeps the others
        try:
            item(key)
        except Exception as e:  # noqa: BLE001 - recorded in the JSON, the check goes on
            figures["errors"][key] = f"{type(e).__name__}: {e}"
        for row in b.rows:
            row["mfu"] = row["gflops"] / peak if row["gflops"] else None
        with open(os.path.join(args.out, "speed.json"), "w") as f:
            json.dump(figures, f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="every part on the CPU, smallest sizes")
    parser.add_argument("--out", default="out/gpu_check", help="the JSON, the logs and the runs")
    parser.add_argument("--stages", default=STAGES, help="the stages of parts 2 and 3")
    # the parts' own processes (options that torchrun's parser cannot mistake for its own)
    parser.add_argument("--worker", choices=["ddp", "speed"], help=argparse.SUPPRESS)
    parser.add_argument("--micro_dir", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return {"ddp": ddp_worker, "speed": speed_worker}[args.worker](args)
    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA device here: run it on a GPU machine, or with --dry on the CPU")

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    device = "cpu" if args.dry else "cuda"
    n_ranks = 1 if args.dry else min(2, torch.cuda.device_count())  # 2 ranks where 2 GPUs are
    micro_dir = os.path.join(out, "micro")
    python = [sys.executable, "-m"]
    torchrun = python + ["torch.distributed.run", "--standalone", f"--nproc_per_node={n_ranks}"]
    worker = ["nanoalign.gpu_check", "--out", out, "--device", device, "--stages", args.stages]
    result = {"command": "python -m nanoalign.gpu_check" + (" --dry" if args.dry else ""),
              "dry": args.dry, "machine": machine.machine_name(device), "device_count": n_ranks,
              "torch": torch.__version__, "cuda": torch.version.cuda, "ok": False, "parts": {}}
    parts = result["parts"]

    def save():  # after every part: a run stopped from outside keeps what was measured
        result["ok"] = len(parts) == 4 and all(p["ok"] for p in parts.values())
        with open(os.path.join(out, "gpu_check.json"), "w") as f:
            json.dump(result, f, indent=1)

    # 1. the cuda-marked tests, on the device
    parts["tests"] = run_part("tests", python + ["pytest", "-q", "-m", "cuda", "-p",
                                                 "no:cacheprovider", "tests/test_gpu_path.py"],
                              out, env={"NANOALIGN_TEST_DEVICE": device})
    save()
    # 2. the micro pipeline in bf16
    parts["pipeline"] = run_part("pipeline", python + [
        "nanoalign.pipeline", "--preset", "micro", "--out", micro_dir, "--stages", args.stages,
        "--device", device, "--dtype", "bfloat16", "--rerun", "all"], out)
    report_path = os.path.join(micro_dir, "report.json")
    if os.path.exists(report_path):
        report = record.read_json(report_path)
        keys = ("gold_score", "win_rate_vs_sft", "kl_to_sft", "end_rate")
        parts["pipeline"]["figures"] = {"total_seconds": report.get("total_seconds"), "stages": {
            name: {k: m.get(k) for k in keys} for name, m in report.get("stages", {}).items()}}
    save()
    # 3. every stage under torchrun: the ranks agree, and every stage took steps
    ddp_worker_args = ["--worker", "ddp", "--micro_dir", micro_dir]
    ddp = run_part("ddp", torchrun + ["-m"] + worker + ddp_worker_args, out)
    ddp.update(ddp_summary(out, n_ranks, args.stages))
    ddp["ok"] = ddp["ok"] and ddp["ranks_agree"] and ddp.get("every_stage_trained", False)
    parts["ddp"] = ddp
    save()
    # 4. speed: every item measured, none failed
    speed = run_part("speed", python + worker + ["--worker", "speed"], out)
    if os.path.exists(os.path.join(out, "speed.json")):
        speed["figures"] = record.read_json(os.path.join(out, "speed.json"))
        speed["ok"] = speed["ok"] and not speed["figures"]["errors"]
    parts["speed"] = speed
    save()
    print_summary(result)
    return result


def print_summary(r: dict):
    verdict = "every part ok" if r["ok"] else "SOME PARTS FAILED"
    print(f"\n{r['command']} | {r['machine']} | torch {r['torch']} (CUDA {r['cuda']}) | {verdict}")
    for name, p in r["parts"].items():
        print(f"  {name:<9} {'ok' if p['ok'] else 'FAILED':<7} {p['seconds']:>6.0f} s   {p['log']}")
    figures = r["parts"]["speed"].get("figures", {})
    for key, error in figures.get("errors", {}).items():
        print(f"  {key}: {error}")
    for row in figures.get("rows", []):
        mfu = f"  MFU {100 * row['mfu']:.1f}%" if row.get("mfu") else ""
        split = ", ".join(f"{k} {v:.0f} ms" for k, v in row["split_ms"].items())
        print(f"  {row['item']:<36} {row['rate']:>10,.0f} {row['unit']}{mfu}"
              f"  peak {row['peak_mem_mb']:,.0f} MB" + (f"  ({split})" if split else ""))


if __name__ == "__main__":
    main()
