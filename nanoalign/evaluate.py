"""
Evaluation: what did each stage do to the model's answers? For every checkpoint, sample one answer per held-out prompt
(one sampling setup for all models: temperature 1, no top-k/top-p) and measure

    gold_score       mean score of the built-in world's judge (null when there is no judge, e.g. on your own data)
    rm_score         mean score of the learned reward model (minus its offset)
    kl_to_sft        sequence-level KL(pi || pi_sft), Monte Carlo: mean over samples of
                     sum_t [log pi(y_t) - log pi_sft(y_t)]
                     (both at the sampling temperature)
    win_rate_vs_sft  P(gold(model answer) > gold(SFT answer)) on the same prompts, ties as 1/2, with a 95% CI; SFT's
                     own win rate is computed against a second, independent set of SFT samples (so it is ~0.5).
                     --judge rm: judged by the reward model instead (biased towards the models trained on it)
    end_rate         share of answers that emit <|end|> before the length limit
    mean_length      tokens per answer;  distinct_2: distinct bigrams / all bigrams over the answers (diversity)

Without the world's judge (your own data) two more measures need no judge at all:

    pref_accuracy    --pairs FILE: on held-out labelled pairs, the share where the model's implicit reward
                     log pi(y)/pi_sft(y) ranks the chosen answer above the rejected one (DPO's implicit reward,
                     Rafailov et al. 2023, eq. 5), ties as 1/2 (TRL's rewards/accuracies and the training stages count
                     them wrong; here SFT itself ties every pair: 0.5), and the reward model's accuracy on them
    human win rate   --labels FILE: win rates from people's decisions in the labelling tool's files (nanoalign.label)

    python -m nanoalign.evaluate --models sft=out/tiny/sft/ckpt.pt,ppo=out/tiny/ppo/ckpt.pt \
        --sft out/tiny/sft/ckpt.pt --reward_model out/tiny/rm/ckpt.pt --out out/tiny/eval.json
    python -m nanoalign.evaluate --models rlvr=out/tiny/rlvr/ckpt.pt --verifiable data/world/verifiable_val.jsonl
    python -m nanoalign.evaluate --models dpo=out/mine/dpo/ckpt.pt --sft out/mine/sft/ckpt.pt --judge rm \
        --reward_model out/mine/rm/ckpt.pt --prompts my_data/hh_test.jsonl --pairs my_data/hh_test.jsonl
    python -m nanoalign.evaluate --labels my_data/human_prefs.jsonl
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common
from nanoalign.data import (DataError, concatenated_batch, load_prefs, load_prompts, load_verifiable, read_jsonl,
                            tokenize_pref)
from nanoalign.generate import generate, response_logprobs, sequence_logps
from nanoalign.rl import load_reward_model, pair_rewards, prompt_text, response_texts, score_last_token
from nanoalign.tokenizer import load_tokenizer, render_chat
from nanoalign.model import GPT


@dataclass
class EvalConfig:
    models: str = ""  # comma-separated name=checkpoint pairs, e.g. "sft=out/tiny/sft/ckpt.pt,dpo=out/tiny/dpo/ckpt.pt"
    sft: str = "out/tiny/sft/ckpt.pt"  # the SFT checkpoint: reference for KL and win rate
    reward_model: str = "out/tiny/rm/ckpt.pt"  # reward model for rm_score ("" = skip)
    prompts: str = "data/world/prompts_eval.jsonl"  # held-out prompts
    n_prompts: int = 600  # how many of them
    judge: str = "gold"  # who judges the win rate: "gold" (the world's judge), "rm" or "none" (gold fields are null)
    temperature: float = 1.0  # sampling temperature (KL is measured at the same temperature)
    max_new_tokens: int = 96  # at least twice the typical answer length, so "no end" means rambling
    batch_size: int = 100  # prompts per generation batch
    seed: int = 0  # sampling seed: evaluation is deterministic given it
    device: str = "auto"  # auto | cpu | cuda
    out: str = ""  # write the results as JSON here ("" = print only)
    verifiable: str = ""  # instead: held-out accuracy on these exact-answer problems (e.g. verifiable_val.jsonl)
    pairs: str = ""  # held-out preference pairs (any schema load_prefs reads): pref_accuracy of each model and the RM
    labels: str = ""  # a labelling tool file (or its .log.jsonl): win rates from people's A/B decisions

    def validate(self):
        common.check(self.judge in ("gold", "rm", "none"), "judge", f"must be gold, rm or none, got {self.judge!r}")
        common.check(self.judge != "rm" or self.reward_model, "judge", "--judge rm needs --reward_model")
        common.check(self.temperature > 0, "temperature", "must be > 0: the KL to SFT is measured at the sampling "
                     "temperature, and at 0 (greedy) the log-probs are undefined")


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


T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def mean_and_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval: Student's t for a few values (seeds), the normal 1.96
    beyond 10 (prompts, problems)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, T_975.get(len(xs), 1.96) * sd / math.sqrt(len(xs))


def win_rate(a, b):
    """P(a > b) with ties as 1/2, and the half-width of its 95% CI over prompts."""
    return mean_and_ci([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)])


def setup(cfg: EvalConfig) -> SimpleNamespace:
    """What every evaluation shares: the SFT model and tokenizer, the prompts, the reward model and the judge."""
    device = common.init_dist(cfg.device).device
    sft_ckpt = common.load_checkpoint(cfg.sft)
    tok = load_tokenizer(sft_ckpt["tokenizer_path"])
    prompts = load_prompts(cfg.prompts)[:cfg.n_prompts]
    judge = None
    if cfg.judge == "gold":
        from nanoalign.world import gold_scores as judge
    return SimpleNamespace(cfg=cfg, device=device, tok=tok, sft=GPT.from_checkpoint(sft_ckpt, device).eval(),
                           prompt_ids=[render_chat(tok, m, add_generation_prompt=True)[0] for m in prompts],
                           prompts=[prompt_text(m) for m in prompts], judge=judge,
                           rm=load_reward_model(cfg.reward_model, device) if cfg.reward_model else None)


def answers_and_scores(s: SimpleNamespace, model, seed: int):
    """One sampled answer per prompt: (batches, texts, gold scores or None, RM scores or None)."""
    batches = sample_answers(model, s.prompt_ids, s.cfg, s.tok, seed, s.device)
    texts = [t for tokens, mask, P in batches for t in response_texts(s.tok, tokens, mask, P)]
    gold = s.judge(s.prompts, texts) if s.judge else None
    rm = None if s.rm is None else torch.cat([score_last_token(s.rm[0], t, m, s.rm[1]) for t, m, _ in batches])
    return batches, texts, gold, rm


def evaluate_models(cfg: EvalConfig, models: dict) -> dict:
    """models: name -> checkpoint path. Returns name -> metrics."""
    s = setup(cfg)
    # SFT answers are the baseline of every win rate; a second independent SFT sample set is SFT's own opponent
    _, _, sft_gold, sft_rm = answers_and_scores(s, s.sft, cfg.seed + 1)
    records = load_prefs(cfg.pairs) if cfg.pairs else []
    pairs = [tokenize_pref(s.tok, ex, s.sft.config.block_size) for ex in records]
    sft_pair_logps = pair_logps(s.sft, pairs, s.tok.pad_id, s.device) if pairs else None
    results = {}
    for name, path in tqdm(models.items(), desc="evaluate", dynamic_ncols=True):
        ckpt = common.load_checkpoint(path, tokenizer=s.tok.name)
        model = GPT.from_checkpoint(ckpt, s.device).eval()
        batches, texts, gold, rm = answers_and_scores(s, model, cfg.seed)
        kl = (sequence_logprob_sums(model, batches, cfg.temperature)
              - sequence_logprob_sums(s.sft, batches, cfg.temperature)).mean().item()
        ended = torch.cat([(tokens[:, P:] == s.tok.end_id).any(1) for tokens, _, P in batches]).float()
        lengths = torch.cat([mask[:, P:].sum(1) for _, mask, P in batches]).float()
        r = {"gold_score": sum(gold) / len(gold) if gold else None,
             "rm_score": None if rm is None else rm.mean().item(), "kl_to_sft": kl, "win_rate_vs_sft": None,
             "win_rate_ci": None, "win_rate_judge": None, "end_rate": ended.mean().item(),
             "mean_length": lengths.mean().item(), "distinct_2": distinct_n(texts)}
        if gold:
            r["win_rate_vs_sft"], r["win_rate_ci"] = win_rate(gold, sft_gold)
            r["win_rate_judge"] = "gold"
        elif cfg.judge == "rm":
            r["win_rate_vs_sft"], r["win_rate_ci"] = win_rate(rm.tolist(), sft_rm.tolist())
            r["win_rate_judge"] = "rm"
        if pairs:  # the implicit reward's ranking; ties (SFT against itself: every pair) count 1/2
            implicit = pair_logps(model, pairs, s.tok.pad_id, s.device) - sft_pair_logps
            r["pref_accuracy"], r["pref_accuracy_ci"] = win_rate(implicit[:, 0].tolist(), implicit[:, 1].tolist())
        r["samples"] = [{"prompt": p, "response": t} for p, t in zip(s.prompts[:3], texts[:3])]
        results[name] = r
    if pairs and s.rm is not None:
        chosen, rejected = pair_rm_scores(s.rm, pairs, s.tok.pad_id, s.device).T.tolist()
        acc, ci = win_rate(chosen, rejected)
        results["reward_model"] = {"pref_accuracy": acc, "pref_accuracy_ci": ci, "pairs": len(pairs)}
        if s.judge is not None and all("gold_chosen" in r for r in records):
            results["reward_model"]["gold_agreement_by_kind"] = agreement_by_kind(records, chosen, rejected)
    return results


def agreement_by_kind(records, rm_chosen, rm_rejected) -> dict:
    """The reward model's agreement with the gold judge on the built-in world's pairs, split by what separates the two
    answers: a question answered right in one and wrong in the other, a story request whose answers mention
    different numbers of the requested names and places (both need the answer checked against the prompt), and the
    rest (sentiment, ending, length, repetition: visible in the answer alone). Pairs the judge ties are left out; an
    RM tie counts as preferring the rejected answer, as in the RM stage's own gold agreement."""
    from nanoalign.world import WORD_RE, check_answer, requested, solve
    kinds = {}
    for rec, c, r in zip(records, rm_chosen, rm_rejected):
        margin = rec["gold_chosen"] - rec["gold_rejected"]
        if margin == 0:
            continue
        prompt = prompt_text(rec["prompt"])
        answer = solve(prompt)
        if answer is not None:  # the judge's topic term: right first sentence, else the answer word somewhere
            credit = [(check_answer(answer, rec[k]), answer in WORD_RE.findall(rec[k].lower()))
                      for k in ("chosen", "rejected")]
            kind = "answer" if credit[0] != credit[1] else "question_other"
        else:  # the judge's topic term: how many of the requested names, animals and places are mentioned
            asked = requested(prompt)
            mentioned = [len(asked & set(WORD_RE.findall(rec[k].lower()))) for k in ("chosen", "rejected")]
            kind = "topic" if mentioned[0] != mentioned[1] else "story_other"
        kinds.setdefault(kind, []).append(((c > r) == (margin > 0), abs(margin)))
    return {k: {"n": len(v), "gold_agreement": sum(a for a, _ in v) / len(v),
                "mean_abs_margin": sum(m for _, m in v) / len(v)} for k, v in sorted(kinds.items())}


def pair_batches(pairs, pad_id, device, batch_size=50):
    """data.concatenated_batch over chunks of tokenized pairs: (tokens, labels, pad_mask), each (2 x chunk, T)."""
    for i in range(0, len(pairs), batch_size):
        yield concatenated_batch(pairs[i:i + batch_size], pad_id, device)


@torch.no_grad()
def pair_logps(model, pairs, pad_id, device, chunk=50) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) over the chosen and the rejected response of each pair: (n, 2)."""
    out = []
    for tokens, labels, _ in pair_batches(pairs, pad_id, device, chunk):
        out.append(sequence_logps(model(tokens), labels).view(2, -1).T)  # right-padded: no mask
    return torch.cat(out)


@torch.no_grad()
def pair_rm_scores(rm, pairs, pad_id, device, chunk=50) -> torch.Tensor:
    """The reward model's score of each pair's chosen and rejected response: (n, 2)."""
    return torch.cat([torch.stack(pair_rewards(rm[0], pairs[i:i + chunk], pad_id, device, rm[1]), 1)
                      for i in range(0, len(pairs), chunk)])


def human_win_rates(path: str) -> dict:
    """Win rates from the labelling tool's decisions (<pairs file>.log.jsonl): for every two models compared, the
    share of prompts where the rater preferred the first (label's --ckpt) to the second (--compare), ties and
    identical answers 1/2, skips left out, with a 95% CI over prompts. Two samples of one model are no contest."""
    log = path if path.endswith(".log.jsonl") else path + ".log.jsonl"
    games = {}
    for line, d in read_jsonl(log):
        models = d.get("models") or sorted([d.get("A"), d.get("B")], key=str)
        if not {"choice", "A", "B"} <= d.keys() or len(models) != 2 or set(models) != {d["A"], d["B"]}:
            raise DataError(f"{log}:{line}: expected a labelling decision with choice, A, B (and models: [A, B] in "
                            f"some order), got {d}")
        if d["choice"] == "skip" or d["A"] == d["B"]:
            continue
        first, second = models if (models[1], models[0]) not in games else models[::-1]  # sessions with swapped roles
        winner = {"A": d["A"], "B": d["B"]}.get(d["choice"])  # None: a tie or identical answers
        games.setdefault((first, second), []).append(0.5 if winner is None else float(winner == first))
    out = {}
    for (first, second), xs in games.items():
        wr, ci = mean_and_ci(xs)
        out[f"{first} vs {second}"] = {"model": first, "opponent": second, "win_rate": wr, "win_rate_ci": ci,
                                       "n": len(xs)}
    return out


def best_of_n(cfg: EvalConfig, ns: list[int]) -> dict:
    """Best-of-n sampling, the baseline with no training: draw n answers from SFT, keep the one the reward model scores
    highest (Stiennon et al. 2020; Gao et al. 2023). Its KL to SFT has the closed form log n - (n-1)/n, an upper bound
    that is tight when the n samples are distinct (Beirami et al. 2024). One pool of max(ns) samples per prompt serves
    every n (its first n). Returns "bon_<n>" -> metrics, on the same prompts and SFT baseline as evaluate_models."""
    s = setup(cfg)
    assert s.rm is not None and s.judge is not None, "best-of-n needs a reward model and the gold judge"
    _, _, sft_gold, _ = answers_and_scores(s, s.sft, cfg.seed + 1)
    pool = [answers_and_scores(s, s.sft, cfg.seed + 1000 + k) for k in tqdm(range(max(ns)), desc="best-of-n pool")]
    rm = torch.stack([p[3] for p in pool])  # (N, prompts)
    gold = torch.tensor([p[2] for p in pool], dtype=torch.float64)
    out = {}
    for n in ns:
        pick = rm[:n].argmax(0, keepdim=True)  # the reward model's favourite of the first n
        g = gold[:n].gather(0, pick)[0].tolist()
        wr, ci = win_rate(g, sft_gold)
        out[f"bon_{n}"] = {"n": n, "gold_score": sum(g) / len(g), "rm_score": rm[:n].gather(0, pick).mean().item(),
                           "kl_to_sft": math.log(n) - (n - 1) / n, "win_rate_vs_sft": wr, "win_rate_ci": ci}
    return out


def verifiable_accuracy(cfg: EvalConfig, models: dict, problems_path: str) -> dict:
    """Held-out accuracy on the world's exact-answer task (the RLVR evaluation): one sampled answer per problem, checked
    by the task's rule (world.check_answer), with a 95% CI; and each model's paired difference to SFT on the same
    problems with its CI (SFT's own against a second, independent SFT sample set)."""
    from nanoalign.world import check_answer
    s = setup(cfg)
    problems = load_verifiable(problems_path)[:cfg.n_prompts]
    ids = [render_chat(s.tok, p["prompt"], add_generation_prompt=True)[0] for p in problems]

    def correct(model, seed):
        texts = [t for tokens, mask, P in sample_answers(model, ids, cfg, s.tok, seed, s.device)
                 for t in response_texts(s.tok, tokens, mask, P)]
        return [float(check_answer(p["answer"], t)) for p, t in zip(problems, texts)]

    sft_correct, results = correct(s.sft, cfg.seed + 1), {}
    for name, path in models.items():
        model = GPT.from_checkpoint(common.load_checkpoint(path, tokenizer=s.tok.name), s.device).eval()
        c = correct(model, cfg.seed)
        acc, ci = mean_and_ci(c)
        diff, diff_ci = mean_and_ci([a - b for a, b in zip(c, sft_correct)])
        results[name] = {"accuracy": acc, "accuracy_ci": ci, "vs_sft": diff, "vs_sft_ci": diff_ci, "n": len(c),
                         "sft_baseline": sum(sft_correct) / len(sft_correct)}  # the second SFT set's accuracy
    return results


# ---------------------------------------------------------------------------------------------- report + plots

REPORT_FIELDS = ["gold_score", "rm_score", "kl_to_sft", "win_rate_vs_sft", "end_rate", "mean_length", "distinct_2"]


def write_report(run_dir, world_dir, preset, eval_overrides, wall, t_start, device="auto", seed=0):
    """Evaluate every stage's checkpoint of a pipeline run; write report.json, report.md and the plots."""
    stage_ckpt = lambda s: os.path.join(run_dir, s, "ckpt.pt")
    names = {"base": "pretrain", "sft": "sft", "ppo": "ppo", "dpo": "dpo", "online_dpo": "online_dpo", "grpo": "grpo",
             "rlvr": "rlvr", "distill": "distill"}
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
    if "rlvr" in models:  # GRPO on the exact-answer task: held-out accuracy against SFT's
        verifiable = verifiable_accuracy(cfg, {"sft": models["sft"], "rlvr": models["rlvr"]},
                                         os.path.join(world_dir, "verifiable_val.jsonl"))
        for name, r in verifiable.items():
            stages[name] |= {"verifiable_" + k: v for k, v in r.items()}
    if "distill" in models:  # the student's size and sampling speed beside its teacher's
        ck = common.load_checkpoint(models["distill"])
        stages["distill"] |= {f"{who}_params": n for who, n in (ck.get("params") or {}).items()}
        stages["distill"] |= {f"{who}_new_tokens_per_s": v for who, v in (ck.get("sampling_speed") or {}).items()}
    world_stats = {}
    if os.path.exists(os.path.join(world_dir, "world.json")):
        with open(os.path.join(world_dir, "world.json")) as f:
            world_stats = json.load(f)
    pre = os.path.join(run_dir, "pretrain", "metrics.jsonl")
    evals = [r for r in common.read_metrics(pre) if "val_loss" in r] if os.path.exists(pre) else []
    val_losses = [r["val_loss"] for r in evals]
    report = {"preset": preset, "machine": common.machine_name(), "total_seconds": time.time() - t_start,
              "stages": stages, "wall_seconds": wall,
              "sampling": {"temperature": cfg.temperature, "top_k": 0, "top_p": 1.0,
                           "max_new_tokens": cfg.max_new_tokens, "n_prompts": cfg.n_prompts},
              "pretrain_val_loss": val_losses[-1] if val_losses else None,
              "entropy_floor": evals[-1].get("entropy_floor") if evals else None,
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
    if "verifiable_accuracy" in report["stages"].get("rlvr", {}):
        sft, rlvr = ({k.removeprefix("verifiable_"): v for k, v in report["stages"][name].items()}
                     for name in ("sft", "rlvr"))
        lines += ["", f"Exact-answer task ({rlvr['n']} held-out problems, one answer each): SFT {sft['accuracy']:.3f} "
                      f"± {sft['accuracy_ci']:.3f}, GRPO with the verifiable reward {rlvr['accuracy']:.3f} ± "
                      f"{rlvr['accuracy_ci']:.3f}. Paired with a second, independent SFT sample set "
                      f"({rlvr['sft_baseline']:.3f}): {rlvr['vs_sft']:+.3f} ± {rlvr['vs_sft_ci']:.3f} for GRPO, "
                      f"{sft['vs_sft']:+.3f} ± {sft['vs_sft_ci']:.3f} for SFT itself (the noise floor)."]
    if "student_params" in report["stages"].get("distill", {}):
        s = report["stages"]["distill"]
        speed = (f", sampling {s['student_new_tokens_per_s'] / s['teacher_new_tokens_per_s']:.1f}x as fast"
                 if s.get("teacher_new_tokens_per_s") else "")
        lines += ["", f"Distillation: a {s['student_params'] / 1e6:.2f}M-parameter student of the "
                      f"{s['teacher_params'] / 1e6:.2f}M-parameter PPO model{speed}."]
    lines += ["", f"Pretraining validation loss {fmt(report['pretrain_val_loss'])} nats/token; the world's entropy "
                  f"floor is {fmt(report['entropy_floor'])}.", "", "![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def plot_run(run_dir):
    """PNG loss/metric curves of every stage found in run_dir (matplotlib, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("pretrain", ["loss", "val_loss"]), ("sft", ["loss", "val_loss"]), ("rm", ["loss", "accuracy"]),
              ("dpo", ["loss", "rewards/margins"]), ("ppo", ["score", "gold", "kl"]), ("grpo", ["score", "gold", "kl"]),
              ("rlvr", ["score", "kl"])]
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
        ax.set_xlabel("iteration" if stage in ("ppo", "grpo", "rlvr") else "step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(run_dir, "training_curves.png"), dpi=110)
    plt.close(fig)




def summarise_seeds(reports: list[dict], seeds: list[int]) -> dict:
    """Every numeric per-stage metric of several pipeline reports as {mean, ci, values} over seeds."""
    stages = {}
    for name, first in reports[0]["stages"].items():
        stages[name] = {}
        for key, value in first.items():
            values = [r["stages"].get(name, {}).get(key) for r in reports]
            if isinstance(value, (int, float)) and all(isinstance(v, (int, float)) for v in values):
                m, ci = mean_and_ci(values)
                stages[name][key] = {"mean": m, "ci": ci, "values": values}
    return {"preset": reports[0]["preset"], "machine": reports[0]["machine"], "seeds": seeds, "stages": stages,
            "total_seconds": [r["total_seconds"] for r in reports]}


def seeds_markdown(summary: dict) -> str:
    pm = lambda s, k, nd=3: "-" if k not in s else f"{s[k]['mean']:.{nd}f} ± {s[k]['ci']:.{nd}f}"
    lines = [f"# nanoalign report over seeds {summary['seeds']} ({summary['preset']})", "",
             f"Machine: {summary['machine']}. Mean ± 95% CI (Student t over seeds).", "",
             "| stage | gold score | win rate vs SFT | KL to SFT | RM score | end rate | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in summary["stages"].items():
        if name != "rm":
            lines.append(f"| {name} | {pm(s, 'gold_score')} | {pm(s, 'win_rate_vs_sft')} | {pm(s, 'kl_to_sft', 2)} | "
                         f"{pm(s, 'rm_score')} | {pm(s, 'end_rate', 2)} | {pm(s, 'wall_seconds', 0)} |")
    if "rm" in summary["stages"]:
        rm = summary["stages"]["rm"]
        lines += ["", f"Reward model: accuracy {pm(rm, 'val_accuracy')}, gold agreement {pm(rm, 'gold_agreement')}."]
    if "verifiable_accuracy" in summary["stages"].get("rlvr", {}):
        sft, rlvr = summary["stages"]["sft"], summary["stages"]["rlvr"]
        lines += ["", f"Exact-answer task: SFT {pm(sft, 'verifiable_accuracy')}, GRPO with the verifiable reward "
                      f"{pm(rlvr, 'verifiable_accuracy')}, paired difference {pm(rlvr, 'verifiable_vs_sft')}."]
    return "\n".join(lines) + "\n"


def plot_sweep(sweep: dict, out_dir: str):
    """frontier.png: gold score against KL to SFT for every method of the sweep (the small-scale analogue of the DPO
    paper's figure 2); overoptimisation.png: the reward model's score and the gold score of a long PPO run with beta 0
    over training (Gao et al. 2023): the proxy keeps rising after the gold score has turned."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    styles = {"ppo": ("tab:red", "o"), "dpo": ("tab:blue", "s"), "bon": ("tab:green", "^"), "grpo": ("tab:purple", "D")}
    for method, (color, marker) in styles.items():
        pts = sorted((r["kl_to_sft"], r["gold_score"], r["label"]) for r in sweep["points"] if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, label=method.upper())
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
            axes[1].plot([max(r["kl"], 0) ** 0.5 for r in rows], [r[key] for r in rows], ".", label=label)
        axes[0].set_xlabel("PPO iteration (beta = 0)")
        axes[1].set_xlabel("sqrt(KL to SFT) of the rollouts")
        for a in axes:
            a.set_ylabel("score of the rollouts")
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "overoptimisation.png"), dpi=110)
        plt.close(fig)


def main(argv=None):
    cfg = common.parse_config(EvalConfig, argv, __doc__)
    models = dict(pair.split("=", 1) for pair in cfg.models.split(",") if pair)
    if not models and not cfg.labels:
        raise SystemExit("--models: give at least one name=checkpoint pair (or --labels FILE)")
    results = {}
    if models:
        results = verifiable_accuracy(cfg, models, cfg.verifiable) if cfg.verifiable else evaluate_models(cfg, models)
    if cfg.labels:
        results["human_labels"] = human_win_rates(cfg.labels)
    text = json.dumps(results, indent=1)
    if cfg.out:
        with open(cfg.out, "w") as f:
            f.write(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
