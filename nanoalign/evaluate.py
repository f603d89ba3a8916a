r"""
Evaluation: what did each stage do to the model's answers? Each checkpoint samples one answer per
held-out prompt (one setup for all: temperature 1, no top-k/top-p), and we measure (definitions in
tutorials/07-beyond.md, "What the evaluation measures"; report.py writes a run's report from them)

    gold_score, rm_score   mean score of the world's judge (null without one) and of the RM
    kl_to_sft              Monte Carlo: mean over answers of sum_t [log pi(y_t) - log pi_sft(y_t)]
    win_rate_vs_sft        P(gold(answer) > gold(SFT's answer)), ties 1/2, with a 95% CI; SFT plays
                           a second SFT sample set (~0.5); --judge rm: the RM judges (biased);
                           --judge module:function: your judge (load_judge), named in
                           win_rate_judge; its mean score, if pointwise, is judge_score
    end_rate, mean_length  share of answers that emit <|end|>; tokens per answer; and distinct_2:
                           distinct bigrams / all bigrams over the answers (diversity)
    pref_accuracy          --pairs FILE, no judge needed: held-out pairs that the implicit reward
                           log pi/pi_sft ranks right (Rafailov et al. 2023, eq. 5), ties 1/2; RM's
    human win rate         --labels FILE: people's choices in a labelling log; and raters' kappas

    python -m nanoalign.evaluate --models sft=out/tiny/sft/ckpt.pt,ppo=out/tiny/ppo/ckpt.pt \
        --sft out/tiny/sft/ckpt.pt --reward_model out/tiny/rm/ckpt.pt --out out/tiny/eval.json
    python -m nanoalign.evaluate --models rlvr=out/tiny/rlvr/ckpt.pt --verifiable VAL.jsonl
    python -m nanoalign.evaluate --models dpo=DPO.pt --sft SFT.pt --reward_model RM.pt \
        --judge rm --prompts my_data/hh_test.jsonl --pairs my_data/hh_test.jsonl
    python -m nanoalign.evaluate --models dpo=DPO.pt --sft SFT.pt --reward_model "" \
        --judge myjudge:prefer --prompts my_data/hh_test.jsonl
"""

import json
import math
import os
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import agreement, common, config, record, world
from nanoalign.batching import tokenize_all, tokenize_pref
from nanoalign.data import load_prefs, load_prompts, load_verifiable
from nanoalign.files import DataError, read_jsonl
from nanoalign.generate import generate, response_logprobs
from nanoalign.model import GPT
from nanoalign.rl import (concatenated_logps, load_reward_model, pair_rewards, prompt_text,
                          response_texts, load_judge, score_last_token)
from nanoalign.tokenizer import render_chat


@dataclass
class EvalConfig:
    models: str = ""  # comma-separated name=checkpoint pairs: sft=out/tiny/sft/ckpt.pt,dpo=...
    sft: str = "out/tiny/sft/ckpt.pt"  # the SFT checkpoint: reference for KL and win rate
    reward_model: str = "out/tiny/rm/ckpt.pt"  # reward model for rm_score ("" = skip)
    prompts: str = "data/world/prompts_eval.jsonl"  # held-out prompts
    n_prompts: int = 600  # how many of them
    judge: str = "gold"  # who judges the win rate: gold (the world's), rm, none, module:function
    temperature: float = 1.0  # sampling temperature (KL is measured at the same temperature)
    max_new_tokens: int = 96  # at least twice the typical answer length, so "no end" means rambling
    batch_size: int = 100  # prompts per generation batch
    seed: int = 0  # sampling seed: evaluation is deterministic given it
    device: str = "auto"  # auto | cpu | cuda
    out: str = ""  # write the results as JSON here ("" = print only)
    verifiable: str = ""  # instead: held-out accuracy on these exact-answer problems
    pairs: str = ""  # held-out preference pairs: pref_accuracy of each model and of the RM
    labels: str = ""  # a labelling tool file (or its .log.jsonl): win rates from people's choices

    def validate(self):
        config.check(self.judge in ("gold", "rm", "none") or ":" in self.judge, "judge",
                     f"must be gold, rm, none or module:function, got {self.judge!r}")
        config.check(self.judge != "rm" or self.reward_model, "judge", "needs --reward_model")
        config.check(self.temperature > 0, "temperature", "must be > 0: the KL to SFT is measured "
                     "at the sampling temperature, and at 0 (greedy) the log-probs are undefined")


def sample_answers(s: SimpleNamespace, model, seed: int, prompt_ids=None):
    """One answer per prompt (s.prompt_ids unless given), given the seed: (batches, texts)."""
    prompt_ids, B = s.prompt_ids if prompt_ids is None else prompt_ids, s.cfg.batch_size
    g = torch.Generator(device=s.device).manual_seed(seed)
    batches = [generate(model, prompt_ids[i:i + B], s.cfg.max_new_tokens, s.tok.end_id,
                        s.tok.pad_id, s.cfg.temperature, generator=g)
               for i in range(0, len(prompt_ids), B)]
    texts = [t for tokens, mask, P in batches for t in response_texts(s.tok, tokens, mask, P)]
    return batches, texts


@torch.no_grad()
def sequence_logprob_sums(model, batches, temperature):
    """sum_t log pi(y_t | x, y_<t) over each answer's real tokens, for answers sampled elsewhere."""
    sums = []
    for tokens, mask, P in batches:
        lp = response_logprobs(model(tokens, pad_mask=mask), tokens, P, temperature)  # (B, N)
        sums.append((lp * mask[:, P:]).sum(1))
    return torch.cat(sums)  # (n,)


def distinct_n(texts, n=2):
    grams = [tuple(t.split()[i:i + n]) for t in texts for i in range(len(t.split()) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def mean_and_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval: Student's t (97.5% quantile, n - 1
    degrees of freedom) for a few values (seeds), the normal 1.96 beyond 10 (prompts, problems)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
    return m, t.get(len(xs), 1.96) * sd / math.sqrt(len(xs))


def win_rate(a, b):
    """P(a > b) with ties as 1/2, and the half-width of its 95% CI over prompts."""
    return mean_and_ci([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)])


def pairwise_win_rate(judge, prompts, answers, baseline) -> tuple[float, float]:
    """P(answer beats baseline) by a pairwise judge and its 95% CI. Each pair is judged in both
    orders and the two verdicts averaged: judges, LLMs and people alike, favour one position
    (Zheng et al. 2023, "Judging LLM-as-a-judge"), and the swap cancels a constant bias."""
    first, swapped = judge(prompts, answers, baseline), judge(prompts, baseline, answers)
    return mean_and_ci([(a + 1 - b) / 2 for a, b in zip(first, swapped)])


def setup(cfg: EvalConfig) -> SimpleNamespace:
    """What every evaluation shares: SFT's model and tokenizer, the prompts, the RM, the judge."""
    device = common.init_dist(cfg.device).device
    sft_ckpt = record.load_checkpoint(cfg.sft)
    tok = record.checkpoint_tokenizer(sft_ckpt)
    prompts = load_prompts(cfg.prompts)[:cfg.n_prompts]
    kind, judge = load_judge(cfg.judge) if cfg.judge not in ("rm", "none") else (None, None)
    sft = GPT.from_checkpoint(sft_ckpt, device).eval()
    prompt_ids = [render_chat(tok, m, add_generation_prompt=True)[0] for m in prompts]
    rm = load_reward_model(cfg.reward_model, device) if cfg.reward_model else None
    # s.judge scores one answer (gold, or yours); s.pairwise compares two
    return SimpleNamespace(cfg=cfg, device=device, tok=tok, sft=sft, prompt_ids=prompt_ids,
                           prompts=[prompt_text(m) for m in prompts], rm=rm,
                           judge=judge if kind == "pointwise" else None,
                           pairwise=judge if kind == "pairwise" else None)


def answers_and_scores(s: SimpleNamespace, model, seed: int):
    """One sampled answer per prompt: (batches, texts, judge scores or None, RM scores or None)."""
    batches, texts = sample_answers(s, model, seed)
    gold = s.judge(s.prompts, texts) if s.judge else None
    rm = (torch.cat([score_last_token(s.rm[0], t, m, s.rm[1]) for t, m, _ in batches])
          if s.rm is not None else None)
    return batches, texts, gold, rm


def evaluate_models(cfg: EvalConfig, models: dict) -> dict:
    """models: name -> checkpoint path. Returns name -> metrics."""
    s = setup(cfg)
    # SFT answers are the baseline of every win rate; a second SFT sample set is SFT's own opponent
    _, sft_texts, sft_gold, sft_rm = answers_and_scores(s, s.sft, cfg.seed + 1)
    records = load_prefs(cfg.pairs) if cfg.pairs else []
    pairs = tokenize_all(tokenize_pref, s.tok, records, s.sft.config.block_size)
    sft_pair_logps = pair_logps(s.sft, pairs, s.tok.pad_id, s.device) if pairs else None
    results = {}
    for name, path in tqdm(models.items(), desc="evaluate", dynamic_ncols=True):
        ckpt = record.load_checkpoint(path, tokenizer=s.tok.name)
        model = GPT.from_checkpoint(ckpt, s.device).eval()
        batches, texts, gold, rm = answers_and_scores(s, model, cfg.seed)
        kl = (sequence_logprob_sums(model, batches, cfg.temperature)
              - sequence_logprob_sums(s.sft, batches, cfg.temperature)).mean().item()
        ended = torch.cat([(t[:, P:] == s.tok.end_id).any(1) for t, _, P in batches]).float()
        lengths = torch.cat([mask[:, P:].sum(1) for _, mask, P in batches]).float()
        score = sum(gold) / len(gold) if gold else None
        r = {"gold_score": score if cfg.judge == "gold" else None,
             "judge_score": score if cfg.judge != "gold" else None,
             "rm_score": None if rm is None else rm.mean().item(), "kl_to_sft": kl,
             "win_rate_vs_sft": None, "win_rate_ci": None,
             "win_rate_judge": cfg.judge if cfg.judge != "none" else None,
             "end_rate": ended.mean().item(), "mean_length": lengths.mean().item(),
             "distinct_2": distinct_n(texts)}
        if gold:
            r["win_rate_vs_sft"], r["win_rate_ci"] = win_rate(gold, sft_gold)
        elif cfg.judge == "rm":
            r["win_rate_vs_sft"], r["win_rate_ci"] = win_rate(rm.tolist(), sft_rm.tolist())
        elif s.pairwise:
            r["win_rate_vs_sft"], r["win_rate_ci"] = pairwise_win_rate(s.pairwise, s.prompts,
                                                                       texts, sft_texts)
        if pairs:  # the implicit reward's ranking; ties (SFT against itself: every pair) count 1/2
            implicit = pair_logps(model, pairs, s.tok.pad_id, s.device) - sft_pair_logps  # (n, 2)
            acc, ci = win_rate(implicit[:, 0].tolist(), implicit[:, 1].tolist())
            r["pref_accuracy"], r["pref_accuracy_ci"] = acc, ci
        r["samples"] = [{"prompt": p, "response": t} for p, t in zip(s.prompts[:3], texts[:3])]
        results[name] = r
    if pairs and s.rm is not None:
        scores = pair_rm_scores(s.rm, pairs, s.tok.pad_id, s.device)  # (n, 2)
        chosen, rejected = scores.T.tolist()  # (2, n)
        acc, ci = win_rate(chosen, rejected)
        rm_row = {"pref_accuracy": acc, "pref_accuracy_ci": ci, "pairs": len(pairs)}
        if cfg.judge == "gold" and all("gold_chosen" in r for r in records):
            rm_row["gold_agreement_by_kind"] = agreement_by_kind(records, chosen, rejected)
        results["reward_model"] = rm_row
    return results


def agreement_by_kind(records, rm_chosen, rm_rejected) -> dict:
    """The reward model's agreement with the gold judge on the world's pairs, by what separates
    the two answers in the judge's terms (world.pair_kind). Pairs the judge ties are left out; an
    RM tie prefers the rejected answer, as in the RM stage's gold agreement."""
    kinds = {}
    for rec, c, r in zip(records, rm_chosen, rm_rejected):
        margin = rec["gold_chosen"] - rec["gold_rejected"]
        if margin == 0:
            continue
        kind = world.pair_kind(prompt_text(rec["prompt"]), rec["chosen"], rec["rejected"])
        kinds.setdefault(kind, []).append(((c > r) == (margin > 0), abs(margin)))
    return {k: {"n": len(v), "gold_agreement": sum(a for a, _ in v) / len(v),
                "mean_abs_margin": sum(m for _, m in v) / len(v)} for k, v in sorted(kinds.items())}


@torch.no_grad()
def pair_logps(model, pairs, pad_id, device, chunk=50) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) over each pair's chosen and rejected response: (n, 2)."""
    return torch.cat([torch.stack(concatenated_logps(model, pairs[i:i + chunk], pad_id, device), 1)
                      for i in range(0, len(pairs), chunk)])


@torch.no_grad()
def pair_rm_scores(rm, pairs, pad_id, device, chunk=50) -> torch.Tensor:
    """The reward model's score of each pair's chosen and rejected response: (n, 2)."""
    return torch.cat([torch.stack(pair_rewards(rm[0], pairs[i:i + chunk], pad_id, device, rm[1]), 1)
                      for i in range(0, len(pairs), chunk)])


def human_win_rates(path: str) -> dict:
    """Win rates from the labelling tool's decisions (<pairs file>.log.jsonl): for each two models,
    the share of prompts where the rater preferred the first (label's --ckpt) to the second
    (--compare), ties 1/2, skips and two samples of one model left out, 95% CI over prompts."""
    log = path if path.endswith(".log.jsonl") else path + ".log.jsonl"
    games = {}
    for line, d in read_jsonl(log):
        models = d.get("models") or sorted([d.get("A"), d.get("B")], key=str)
        complete = {"choice", "A", "B"} <= d.keys() and len(models) == 2
        if not complete or set(models) != {d["A"], d["B"]}:
            raise DataError(f"{log}:{line}: expected a labelling decision with choice, A, B (and "
                            f"models: [A, B] in some order), got {d}")
        if d["choice"] == "skip" or d["A"] == d["B"]:
            continue
        # a session with the roles swapped counts towards the pair as first seen
        first, second = models if (models[1], models[0]) not in games else models[::-1]
        winner = {"A": d["A"], "B": d["B"]}.get(d["choice"])  # None: a tie or identical answers
        score = 0.5 if winner is None else float(winner == first)
        games.setdefault((first, second), []).append(score)
    out = {}
    for (first, second), xs in games.items():
        wr, ci = mean_and_ci(xs)
        out[f"{first} vs {second}"] = {"model": first, "opponent": second, "win_rate": wr,
                                       "win_rate_ci": ci, "n": len(xs)}
    return out


def verifiable_accuracy(cfg: EvalConfig, models: dict, problems_path: str) -> dict:
    """Held-out accuracy on the world's exact-answer task (RLVR): one answer per problem, checked
    by world.check_answer, with a 95% CI; and the paired difference to SFT on the same problems
    (SFT's own against a second SFT sample set, whose accuracy is sft_baseline)."""
    s = setup(cfg)
    problems = load_verifiable(problems_path)[:cfg.n_prompts]
    ids = [render_chat(s.tok, p["prompt"], add_generation_prompt=True)[0] for p in problems]
    correct = lambda model, seed: [float(world.check_answer(p["answer"], t)) for p, t
                                   in zip(problems, sample_answers(s, model, seed, ids)[1])]
    sft_correct, results = correct(s.sft, cfg.seed + 1), {}
    for name, path in models.items():
        ckpt = record.load_checkpoint(path, tokenizer=s.tok.name)
        c = correct(GPT.from_checkpoint(ckpt, s.device).eval(), cfg.seed)
        acc, ci = mean_and_ci(c)
        diff, diff_ci = mean_and_ci([a - b for a, b in zip(c, sft_correct)])
        results[name] = {"accuracy": acc, "accuracy_ci": ci, "vs_sft": diff, "vs_sft_ci": diff_ci,
                         "n": len(c), "sft_baseline": sum(sft_correct) / len(sft_correct)}
    return results


def main(argv=None):
    cfg = config.parse_config(EvalConfig, argv, __doc__)
    models = dict(pair.split("=", 1) for pair in cfg.models.split(",") if pair)
    if not models and not cfg.labels:
        raise SystemExit("--models: give at least one name=checkpoint pair (or --labels FILE)")
    results = {}
    if models:
        results = (verifiable_accuracy(cfg, models, cfg.verifiable) if cfg.verifiable
                   else evaluate_models(cfg, models))
    if cfg.labels:
        results["human_labels"] = human_win_rates(cfg.labels)
        results["rater_agreement"] = agreement.rater_agreement(cfg.labels)
    text = json.dumps(results, indent=1)
    if cfg.out:
        with open(cfg.out, "w") as f:
            f.write(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
