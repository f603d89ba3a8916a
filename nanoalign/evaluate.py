"""
Evaluation: what did each stage do to the model's answers? For every checkpoint, sample one answer per held-out prompt
(one sampling setup for all models: temperature 1, no top-k/top-p) and measure

    gold_score       mean score of the built-in world's judge (null when there is no judge, e.g. on your own data)
    rm_score         mean score of the learned reward model (minus its offset)
    kl_to_sft        sequence-level KL(pi || pi_sft), Monte Carlo: mean over samples of
                     sum_t [log pi(y_t) - log pi_sft(y_t)]
                     (both at the sampling temperature)
    win_rate_vs_sft  P(gold(model answer) > gold(SFT answer)) on the same prompts, ties as 1/2, with a 95% CI; SFT's
                     own win rate is computed against a second, independent set of SFT samples (so it is ~0.5)
    end_rate         share of answers that emit <|end|> before the length limit
    mean_length      tokens per answer;  distinct_2: distinct bigrams / all bigrams over the answers (diversity)

    python -m nanoalign.evaluate --models sft=out/tiny/sft/ckpt.pt,ppo=out/tiny/ppo/ckpt.pt \
        --sft out/tiny/sft/ckpt.pt --reward_model out/tiny/rm/ckpt.pt --out out/tiny/eval.json
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common
from nanoalign.data import load_prompts
from nanoalign.generate import generate, response_logprobs
from nanoalign.rl import load_reward_model, prompt_text, response_texts, score_last_token
from nanoalign.tokenizer import load_tokenizer, render_chat


@dataclass
class EvalConfig:
    models: str = ""  # comma-separated name=checkpoint pairs, e.g. "sft=out/tiny/sft/ckpt.pt,dpo=out/tiny/dpo/ckpt.pt"
    sft: str = "out/tiny/sft/ckpt.pt"  # the SFT checkpoint: reference for KL and win rate
    reward_model: str = "out/tiny/rm/ckpt.pt"  # reward model for rm_score ("" = skip)
    prompts: str = "data/world/prompts_eval.jsonl"  # held-out prompts
    n_prompts: int = 600  # how many of them
    judge: str = "gold"  # "gold" (the built-in world's judge) or "none" (your own data: gold fields are null)
    temperature: float = 1.0  # sampling temperature (KL is measured at the same temperature)
    max_new_tokens: int = 96  # at least twice the typical answer length, so "no end" means rambling
    batch_size: int = 100  # prompts per generation batch
    seed: int = 0  # sampling seed: evaluation is deterministic given it
    device: str = "auto"  # auto | cpu | cuda
    out: str = ""  # write the results as JSON here ("" = print only)


def sample_answers(model, prompt_ids, cfg, tok, seed, device):
    """One answer per prompt: list of (tokens, pad_mask, P) batches, deterministic given the seed."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, len(prompt_ids), cfg.batch_size):
        out.append(generate(model, prompt_ids[i:i + cfg.batch_size], cfg.max_new_tokens, tok.end_id, tok.pad_id,
                            cfg.temperature, generator=g))
    return out


@torch.no_grad()
def sequence_logprob_sums(model, batches, temperature):
    """sum_t log pi(y_t | x, y_<t) over each answer's real tokens, for answers sampled elsewhere. (n,)"""
    sums = []
    for tokens, mask, P in batches:
        lp = response_logprobs(model(tokens, pad_mask=mask), tokens, P, temperature)
        sums.append((lp * mask[:, P:]).sum(1))
    return torch.cat(sums)


def distinct_n(texts, n=2):
    grams = [tuple(t.split()[i:i + n]) for t in texts for i in range(len(t.split()) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def win_rate(a, b):
    """P(a > b) with ties as 1/2, and the half-width of its 95% normal-approximation CI over prompts."""
    w = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    mean = sum(w) / len(w)
    var = sum((x - mean) ** 2 for x in w) / max(1, len(w) - 1)
    return mean, 1.96 * math.sqrt(var / len(w))


def evaluate_models(cfg: EvalConfig, models: dict) -> dict:
    """models: name -> checkpoint path. Returns name -> metrics."""
    device = common.init_dist(cfg.device).device
    sft_ckpt = common.load_checkpoint(cfg.sft)
    tok = load_tokenizer(sft_ckpt["tokenizer_path"])
    sft = common.build_model(sft_ckpt, device).eval()
    prompts = load_prompts(cfg.prompts)[:cfg.n_prompts]
    prompt_ids = [render_chat(tok, m, add_generation_prompt=True)[0] for m in prompts]
    texts_of_prompts = [prompt_text(m) for m in prompts]
    rm = load_reward_model(cfg.reward_model, device) if cfg.reward_model else None
    judge = None
    if cfg.judge == "gold":
        from nanoalign.world import gold_scores as judge

    def answers_and_scores(model, seed):
        batches = sample_answers(model, prompt_ids, cfg, tok, seed, device)
        texts = [t for tokens, mask, P in batches for t in response_texts(tok, tokens, mask, P)]
        gold = judge(texts_of_prompts, texts) if judge else None
        return batches, texts, gold

    # SFT answers are the baseline of every win rate; a second independent SFT sample set is SFT's own opponent
    sft_batches, _, sft_gold = answers_and_scores(sft, cfg.seed + 1)
    results = {}
    for name, path in tqdm(models.items(), desc="evaluate", dynamic_ncols=True):
        ckpt = common.load_checkpoint(path, tokenizer=tok.name)
        model = common.build_model(ckpt, device).eval()
        batches, texts, gold = answers_and_scores(model, cfg.seed)
        kl = (sequence_logprob_sums(model, batches, cfg.temperature)
              - sequence_logprob_sums(sft, batches, cfg.temperature)).mean().item()
        ended = torch.cat([(tokens[:, P:] == tok.end_id).any(1) for tokens, _, P in batches]).float()
        lengths = torch.cat([mask[:, P:].sum(1) for _, mask, P in batches]).float()
        r = {"gold_score": sum(gold) / len(gold) if gold else None, "rm_score": None, "kl_to_sft": kl,
             "win_rate_vs_sft": None, "win_rate_ci": None, "end_rate": ended.mean().item(),
             "mean_length": lengths.mean().item(), "distinct_2": distinct_n(texts)}
        if rm is not None:
            r["rm_score"] = torch.cat([score_last_token(rm[0], t, m, rm[1]) for t, m, _ in batches]).mean().item()
        if gold:
            r["win_rate_vs_sft"], r["win_rate_ci"] = win_rate(gold, sft_gold)
        r["samples"] = [{"prompt": p, "response": t} for p, t in zip(texts_of_prompts[:3], texts[:3])]
        results[name] = r
    return results


# ---------------------------------------------------------------------------------------------- report + plots

REPORT_FIELDS = ["gold_score", "rm_score", "kl_to_sft", "win_rate_vs_sft", "end_rate", "mean_length", "distinct_2"]


def write_report(run_dir, world_dir, preset, eval_overrides, wall, t_start, device="auto", seed=0):
    """Evaluate every stage's checkpoint of a pipeline run; write report.json, report.md and the plots."""
    stage_ckpt = lambda s: os.path.join(run_dir, s, "ckpt.pt")
    names = {"base": "pretrain", "sft": "sft", "ppo": "ppo", "dpo": "dpo", "online_dpo": "online_dpo", "grpo": "grpo"}
    models = {k: stage_ckpt(v) for k, v in names.items() if os.path.exists(stage_ckpt(v))}
    argv = [f"--{k}={v}" for k, v in eval_overrides.items()]
    has_rm = os.path.exists(stage_ckpt("rm"))
    cfg = common.parse_config(EvalConfig, argv + ["--sft", stage_ckpt("sft"), "--prompts",
                                                  os.path.join(world_dir, "prompts_eval.jsonl"), "--reward_model",
                                                  stage_ckpt("rm") if has_rm else "", "--device", device,
                                                  "--seed", str(seed)])
    results = evaluate_models(cfg, models)
    stages = {}
    for name, r in results.items():
        stages[name] = {k: r[k] for k in REPORT_FIELDS} | {"win_rate_ci": r["win_rate_ci"],
                                                          "wall_seconds": wall.get(names[name], 0.0),
                                                          "samples": r["samples"]}
    if has_rm:
        rm_metrics = common.load_checkpoint(stage_ckpt("rm")).get("metrics") or {}
        stages["rm"] = {"val_accuracy": rm_metrics.get("val_accuracy"), "wall_seconds": wall.get("rm", 0.0),
                        "gold_agreement": rm_metrics.get("gold_agreement")}
        stages["rm"] |= {k: v for k, v in rm_metrics.items() if k.startswith("gold_agreement_")}  # per margin bucket
    world_stats = {}
    if os.path.exists(os.path.join(world_dir, "world.json")):
        with open(os.path.join(world_dir, "world.json")) as f:
            world_stats = json.load(f)
    pre = os.path.join(run_dir, "pretrain", "metrics.jsonl")
    val_losses = [r["val_loss"] for r in common.read_metrics(pre) if "val_loss" in r] if os.path.exists(pre) else []
    report = {"preset": preset, "machine": common.machine_name(), "total_seconds": time.time() - t_start,
              "stages": stages, "wall_seconds": wall,
              "sampling": {"temperature": cfg.temperature, "top_k": 0, "top_p": 1.0,
                           "max_new_tokens": cfg.max_new_tokens, "n_prompts": cfg.n_prompts},
              "pretrain_val_loss": val_losses[-1] if val_losses else None,
              "entropy_floor": world_stats.get("entropy_floor_nats_per_token"),
              "world": {k: world_stats.get(k) for k in ("world_hash", "judge_max", "sft_mean_gold",
                                                        "expected_flip_rate", "empirical_flip_rate")}}
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write(report_markdown(report))
    plot_run(run_dir)
    return report


def fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def report_markdown(report) -> str:
    lines = [f"# nanoalign report ({report['preset']})", "",
             f"Machine: {report['machine']}. Total wall time: {report['total_seconds']:.0f} s. "
             f"Sampling: temperature {report['sampling']['temperature']}, no top-k/top-p, "
             f"{report['sampling']['max_new_tokens']} new tokens at most.", "",
             "| stage | gold score | win rate vs SFT (95% CI) | KL to SFT | RM score | end rate | length "
             "| distinct-2 | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["stages"].items():
        if name == "rm":
            continue
        wr = "-" if r["win_rate_vs_sft"] is None else f"{r['win_rate_vs_sft']:.3f} ± {r['win_rate_ci']:.3f}"
        lines.append(f"| {name} | {fmt(r['gold_score'])} | {wr} | {fmt(r['kl_to_sft'], 2)} | {fmt(r['rm_score'])} | "
                     f"{fmt(r['end_rate'], 2)} | {fmt(r['mean_length'], 1)} | {fmt(r['distinct_2'], 3)} | "
                     f"{r['wall_seconds']:.0f} |")
    if "rm" in report["stages"]:
        rm = report["stages"]["rm"]
        lines += ["", f"Reward model: held-out accuracy {fmt(rm['val_accuracy'])} against the annotators' (noisy) "
                      f"labels, agreement with the gold judge {fmt(rm['gold_agreement'])}."]
    lines += ["", f"Pretraining validation loss {fmt(report['pretrain_val_loss'])} nats/token; the world's entropy "
                  f"floor is {fmt(report['entropy_floor'])}.", "", "![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def plot_run(run_dir):
    """PNG loss/metric curves of every stage found in run_dir (matplotlib, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("pretrain", ["loss", "val_loss"]), ("sft", ["loss", "val_loss"]), ("rm", ["loss", "accuracy"]),
              ("dpo", ["loss", "rewards/margins"]), ("ppo", ["score", "gold", "kl"]), ("grpo", ["score", "gold", "kl"])]
    panels = [(s, keys) for s, keys in panels if os.path.exists(os.path.join(run_dir, s, "metrics.jsonl"))]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (stage, keys) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        rows = common.read_metrics(os.path.join(run_dir, stage, "metrics.jsonl"))
        for key in keys:
            pts = [(r.get("step", r.get("iter")), r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 20 else None)
        ax.set_title(stage)
        ax.set_xlabel("iteration" if stage in ("ppo", "grpo") else "step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "training_curves.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    cfg = common.parse_config(EvalConfig, argv, __doc__)
    models = dict(pair.split("=", 1) for pair in cfg.models.split(",") if pair)
    if not models:
        raise SystemExit("--models: give at least one name=checkpoint pair")
    results = evaluate_models(cfg, models)
    text = json.dumps(results, indent=1)
    if cfg.out:
        with open(cfg.out, "w") as f:
            f.write(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
