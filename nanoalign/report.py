"""The pipeline's reports, from evaluate.py's measures: a run's report.json/.md and training
curves (fields: tutorials/07-beyond.md); the seed tables (mean and 95% CI over seeds); the sweep's
sweep.json with the reward-KL frontier (best-of-n beside the trained methods) and over-optimisation.
"""

import json
import math
import os
import time

import torch
from tqdm import tqdm

from nanoalign import config, machine, plot, record
from nanoalign.evaluate import (EvalConfig, answers_and_scores, evaluate_models, mean_and_ci,
                                setup, verifiable_accuracy, win_rate)

REPORT_FIELDS = ["gold_score", "rm_score", "kl_to_sft", "win_rate_vs_sft", "end_rate",
                 "mean_length", "distinct_2"]
MODEL_STAGES = {"base": "pretrain", "sft": "sft", "ppo": "ppo", "dpo": "dpo",
                "online_dpo": "online_dpo", "grpo": "grpo", "rlvr": "rlvr", "distill": "distill"}


def eval_config(run_dir, world_dir, overrides: dict, device="auto", seed=0) -> EvalConfig:
    """A pipeline run's evaluation: the preset's overrides, the run's SFT and RM, the world."""
    rm = os.path.join(run_dir, "rm", "ckpt.pt")
    argv = [f"--{k}={v}" for k, v in overrides.items()]
    argv += ["--sft", os.path.join(run_dir, "sft", "ckpt.pt"), "--device", device,
             "--seed", str(seed), "--reward_model", rm if os.path.exists(rm) else "",
             "--prompts", os.path.join(world_dir, "prompts_eval.jsonl")]
    return config.parse_config(EvalConfig, argv)


def write_report(run_dir, world_dir, preset, eval_overrides, wall, t_start, device="auto", seed=0):
    """Evaluate every stage's checkpoint of a pipeline run; write report.json, .md and the plot."""
    stage_ckpt = lambda s: os.path.join(run_dir, s, "ckpt.pt")
    models = {k: stage_ckpt(v) for k, v in MODEL_STAGES.items() if os.path.exists(stage_ckpt(v))}
    cfg = eval_config(run_dir, world_dir, eval_overrides, device, seed)
    results = evaluate_models(cfg, models)
    stages = {}
    for name, r in results.items():
        stages[name] = {k: r[k] for k in REPORT_FIELDS + ["win_rate_ci"]}
        stages[name] |= {"wall_seconds": wall.get(MODEL_STAGES[name], 0.0), "samples": r["samples"]}
    if os.path.exists(stage_ckpt("rm")):
        rm_metrics = record.load_checkpoint(stage_ckpt("rm")).get("metrics") or {}
        stages["rm"] = {"val_accuracy": rm_metrics.get("val_accuracy"),
                        "wall_seconds": wall.get("rm", 0.0),
                        "gold_agreement": rm_metrics.get("gold_agreement")}
        # and the gold agreement per margin bucket
        stages["rm"] |= {k: v for k, v in rm_metrics.items() if k.startswith("gold_agreement_")}
    # GRPO on the exact-answer task: held-out accuracy against SFT's
    if "rlvr" in models:
        verifiable = verifiable_accuracy(cfg, {"sft": models["sft"], "rlvr": models["rlvr"]},
                                         os.path.join(world_dir, "verifiable_val.jsonl"))
        for name, r in verifiable.items():
            stages[name] |= {"verifiable_" + k: v for k, v in r.items()}
    # the student's size and sampling speed beside its teacher's
    if "distill" in models:
        ck = record.load_checkpoint(models["distill"])
        speed = ck.get("sampling_speed") or {}
        stages["distill"] |= {f"{who}_params": n for who, n in (ck.get("params") or {}).items()}
        stages["distill"] |= {f"{who}_new_tokens_per_s": v for who, v in speed.items()}
    world_json = os.path.join(world_dir, "world.json")
    world_stats = record.read_json(world_json) if os.path.exists(world_json) else {}
    # the last evaluation row of pretraining: its validation loss and the world's entropy floor
    pre = os.path.join(run_dir, "pretrain", "metrics.jsonl")
    evals = [r for r in record.read_metrics(pre) if "val_loss" in r] if os.path.exists(pre) else []
    world_keys = ("world_hash", "judge_max", "sft_mean_gold", "expected_flip_rate",
                  "empirical_flip_rate")
    report = {"preset": preset, "machine": machine.machine_name(),
              "total_seconds": time.time() - t_start, "stages": stages, "wall_seconds": wall,
              "sampling": {"temperature": cfg.temperature, "top_k": 0, "top_p": 1.0,
                           "max_new_tokens": cfg.max_new_tokens, "n_prompts": cfg.n_prompts},
              "pretrain_val_loss": evals[-1]["val_loss"] if evals else None,
              "entropy_floor": evals[-1].get("entropy_floor") if evals else None,
              "world": {k: world_stats.get(k) for k in world_keys}}
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(report_markdown(report))
    plot_run(run_dir)
    return report


def fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def report_markdown(report) -> str:
    sampling = report["sampling"]
    lines = [f"# nanoalign report ({report['preset']})", "",
             f"Machine: {report['machine']}. Total wall time: {report['total_seconds']:.0f} s. "
             f"Sampling: temperature {sampling['temperature']}, no top-k/top-p, "
             f"{sampling['max_new_tokens']} new tokens at most.", "",
             "| stage | gold score | win rate vs SFT (95% CI) | KL to SFT | RM score | end rate "
             "| length | distinct-2 | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["stages"].items():
        if name == "rm":
            continue
        wr = ("-" if r["win_rate_vs_sft"] is None
              else f"{r['win_rate_vs_sft']:.3f} ± {r['win_rate_ci']:.3f}")
        lines.append(f"| {name} | {fmt(r['gold_score'])} | {wr} | {fmt(r['kl_to_sft'], 2)} | "
                     f"{fmt(r['rm_score'])} | {fmt(r['end_rate'], 2)} | {fmt(r['mean_length'], 1)} "
                     f"| {fmt(r['distinct_2'], 3)} | {r['wall_seconds']:.0f} |")
    if "rm" in report["stages"]:
        rm = report["stages"]["rm"]
        lines += ["", f"Reward model: held-out accuracy {fmt(rm['val_accuracy'])} against the "
                      f"annotators' (noisy) labels, agreement with the gold judge "
                      f"{fmt(rm['gold_agreement'])}."]
    if "verifiable_accuracy" in report["stages"].get("rlvr", {}):
        sft, rlvr = ({k.removeprefix("verifiable_"): v for k, v in report["stages"][name].items()}
                     for name in ("sft", "rlvr"))
        pm = lambda d, k, sign="": f"{d[k]:{sign}.3f} ± {d[k + '_ci']:.3f}"
        lines += ["", f"Exact-answer task ({rlvr['n']} held-out problems, one answer each): SFT "
                      f"{pm(sft, 'accuracy')}, GRPO with the verifiable reward "
                      f"{pm(rlvr, 'accuracy')}. Paired with a second, independent SFT sample set "
                      f"({rlvr['sft_baseline']:.3f}): {pm(rlvr, 'vs_sft', '+')} for GRPO, "
                      f"{pm(sft, 'vs_sft', '+')} for SFT itself (the noise floor)."]
    if "student_params" in report["stages"].get("distill", {}):
        s = report["stages"]["distill"]
        speed = (f", sampling {s['student_new_tokens_per_s'] / s['teacher_new_tokens_per_s']:.1f}x"
                 " as fast" if s.get("teacher_new_tokens_per_s") else "")
        lines += ["", f"Distillation: a {s['student_params'] / 1e6:.2f}M-parameter student of the "
                      f"{s['teacher_params'] / 1e6:.2f}M-parameter PPO model{speed}."]
    lines += ["", f"Pretraining validation loss {fmt(report['pretrain_val_loss'])} nats/token; "
                  f"the world's entropy floor is {fmt(report['entropy_floor'])}.", "",
              "![training curves](training_curves.png)", ""]
    return "\n".join(lines)


# each stage's panels in training_curves.png; "a+b" shares a panel
RUN_PANELS = {"pretrain": ["loss+val_loss"], "sft": ["loss+val_loss"],
              "rm": ["loss", "accuracy+val_accuracy"],
              "dpo": ["loss", "rewards/margins", "logps/chosen+logps/rejected"],
              "ppo": ["score+gold", "kl"], "grpo": ["score+gold", "kl"], "rlvr": ["score", "kl"]}


def plot_run(run_dir):
    """training_curves.png: every stage found in run_dir, one panel per metric (or pair of
    metrics), smoothed, with plot.py's reference lines (the entropy floor and the unigram entropy
    on the pretraining loss, log 2 on the pairwise losses, chance on accuracies)."""
    panels = []
    for stage, specs in RUN_PANELS.items():
        path = os.path.join(run_dir, stage, "metrics.jsonl")
        rows = record.read_metrics(path) if os.path.exists(path) else []
        for spec in specs:
            keys = [k for k in spec.split("+") if any(k in r for r in rows)]
            if keys:
                panels.append((f"{stage}: {', '.join(keys)}", [(k, rows, k) for k in keys]))
    if panels:
        plot.draw_panels(panels, os.path.join(run_dir, "training_curves.png"), cols=4)


# -------------------------------------------------------------------------------------- seeds
def summarise_seeds(reports: list[dict], seeds: list[int]) -> dict:
    """Every numeric per-stage metric of several pipeline reports as {mean, ci, values}."""
    stages = {}
    for name, first in reports[0]["stages"].items():
        stages[name] = {}
        for key, value in first.items():
            values = [r["stages"].get(name, {}).get(key) for r in reports]
            if isinstance(value, (int, float)) and all(isinstance(v, (int, float)) for v in values):
                m, ci = mean_and_ci(values)
                stages[name][key] = {"mean": m, "ci": ci, "values": values}
    return {"preset": reports[0]["preset"], "machine": reports[0]["machine"], "seeds": seeds,
            "stages": stages, "total_seconds": [r["total_seconds"] for r in reports]}


def seeds_markdown(summary: dict) -> str:
    pm = lambda s, k, nd=3: "-" if k not in s else f"{s[k]['mean']:.{nd}f} ± {s[k]['ci']:.{nd}f}"
    lines = [f"# nanoalign report over seeds {summary['seeds']} ({summary['preset']})", "",
             f"Machine: {summary['machine']}. Mean ± 95% CI (Student t over seeds).", "",
             "| stage | gold score | win rate vs SFT | KL to SFT | RM score | end rate | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary["stages"].items():
        if name != "rm":
            lines.append(f"| {name} | {pm(s, 'gold_score')} | {pm(s, 'win_rate_vs_sft')} | "
                         f"{pm(s, 'kl_to_sft', 2)} | {pm(s, 'rm_score')} | "
                         f"{pm(s, 'end_rate', 2)} | {pm(s, 'wall_seconds', 0)} |")
    if "rm" in summary["stages"]:
        rm = summary["stages"]["rm"]
        lines += ["", f"Reward model: accuracy {pm(rm, 'val_accuracy')}, gold agreement "
                      f"{pm(rm, 'gold_agreement')}."]
    if "verifiable_accuracy" in summary["stages"].get("rlvr", {}):
        sft, rlvr = summary["stages"]["sft"], summary["stages"]["rlvr"]
        lines += ["", f"Exact-answer task: SFT {pm(sft, 'verifiable_accuracy')}, GRPO with the "
                      f"verifiable reward {pm(rlvr, 'verifiable_accuracy')}, paired difference "
                      f"{pm(rlvr, 'verifiable_vs_sft')}."]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- sweep
def best_of_n(cfg: EvalConfig, ns: list[int]) -> dict:
    """Best-of-n, the baseline with no training: of n SFT answers keep the reward model's favourite
    (Stiennon et al. 2020; Gao et al. 2023); KL = log n - (n-1)/n, tight for distinct samples
    (Beirami et al. 2024). One pool of max(ns) samples per prompt serves every n (its first n)."""
    s = setup(cfg)
    assert s.rm is not None and s.judge is not None, "best-of-n needs an RM and the gold judge"
    _, _, sft_gold, _ = answers_and_scores(s, s.sft, cfg.seed + 1)
    pool = [answers_and_scores(s, s.sft, cfg.seed + 1000 + k)
            for k in tqdm(range(max(ns)), desc="best-of-n pool")]
    rm = torch.stack([p[3] for p in pool])  # (N, prompts)
    gold = torch.tensor([p[2] for p in pool], dtype=torch.float64)  # (N, prompts)
    out = {}
    for n in ns:
        pick = rm[:n].argmax(0, keepdim=True)  # (1, prompts): the RM's favourite of the first n
        g = gold[:n].gather(0, pick)[0].tolist()
        wr, ci = win_rate(g, sft_gold)
        out[f"bon_{n}"] = {"n": n, "gold_score": sum(g) / len(g),
                           "rm_score": rm[:n].gather(0, pick).mean().item(),
                           "kl_to_sft": math.log(n) - (n - 1) / n, "win_rate_vs_sft": wr,
                           "win_rate_ci": ci}
    return out


def write_sweep(sweep_dir, cfg: EvalConfig, runs: dict, best_of: list[int], overopt: str,
                preset: str, t_start: float) -> dict:
    """The sweep's report: SFT, every run of `runs` (method -> [(name, beta's field, checkpoint)])
    and SFT's best-of-n, on the same held-out prompts; overopt: the metrics.jsonl of the long
    beta = 0 PPO run ("" = none). Writes sweep.json, frontier.png and overoptimisation.png."""
    models = {"sft": cfg.sft} | {name: path for method in runs for name, _, path in runs[method]}
    results = evaluate_models(cfg, models)
    points = [{"method": "sft", "label": "SFT", **results["sft"]}]
    for method in runs:
        for name, key, _ in runs[method]:
            beta = record.load_checkpoint(models[name])["config"][key]
            points.append({"method": method, "label": f"{beta:g}", "beta": beta, **results[name]})
    bon = best_of_n(cfg, best_of)
    points += [{"method": "bon", "label": f"n={r['n']}", **r} for r in bon.values()]
    for p in points:
        p.pop("samples", None)
    overopt_rows = [r for r in record.read_metrics(overopt) if "score" in r] if overopt else []
    sweep = {"preset": preset, "machine": machine.machine_name(),
             "total_seconds": time.time() - t_start,
             "sampling": {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
                          "n_prompts": cfg.n_prompts},
             "points": points, "overoptimisation": overopt_rows}
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump(sweep, f, indent=1)
    plot_sweep(sweep, sweep_dir)
    for p in points:
        print(f"[sweep] {p['method']:5s} {p['label']:>7s}  KL {p['kl_to_sft']:6.2f}  gold "
              f"{p['gold_score']:6.3f}  win rate {p['win_rate_vs_sft']:.3f} ± "
              f"{p['win_rate_ci']:.3f}")
    return sweep


def plot_sweep(sweep: dict, out_dir: str):
    """frontier.png: gold score against KL to SFT of every method (the DPO paper's figure 2, small);
    overoptimisation.png: the RM's and the gold score of the rollouts of a long PPO run with beta 0
    (Gao et al. 2023): the proxy keeps rising after the gold score has turned."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    styles = {"ppo": ("tab:red", "o"), "dpo": ("tab:blue", "s"), "bon": ("tab:green", "^"),
              "grpo": ("tab:purple", "D")}
    for method, (color, marker) in styles.items():
        pts = sorted((r["kl_to_sft"], r["gold_score"], r["label"]) for r in sweep["points"]
                     if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker,
                    label=method.upper())
            for x, y, label in pts:
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    sft = next(r for r in sweep["points"] if r["method"] == "sft")
    ax.scatter([0], [sft["gold_score"]], color="black", zorder=3, label="SFT")
    ax.set_xlabel("KL(pi || pi_SFT), nats per answer")
    ax.set_ylabel("gold score (held-out prompts)")
    ax.set_title("reward-KL frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "frontier.png"), dpi=110)
    plt.close(fig)
    rows = [r for r in sweep.get("overoptimisation", []) if r.get("score") is not None]
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        it = [r["iter"] for r in rows]
        for key, label in [("score", "reward model (proxy)"), ("gold", "gold judge")]:
            axes[0].plot(it, [r[key] for r in rows], label=label)
            axes[1].plot([max(r["kl"], 0) ** 0.5 for r in rows], [r[key] for r in rows], ".",
                         label=label)
        axes[0].set_xlabel("PPO iteration (beta = 0)")
        axes[1].set_xlabel("sqrt(KL to SFT) of the rollouts")
        for a in axes:
            a.set_ylabel("score of the rollouts")
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "overoptimisation.png"), dpi=110)
        plt.close(fig)
