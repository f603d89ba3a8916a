"""
The run doctor: reads a stage's metrics.jsonl for the known failure signatures and says, once per
signature, what it usually means and where the tutorials explain it. It runs after training, never
inside the loop (the loop's only check is a non-finite loss, in record.MetricsLog); the pipeline
calls it after every stage.

    python -m nanoalign.doctor out/tiny/ppo/metrics.jsonl out/tiny/dpo/metrics.jsonl

Thresholds are loose on purpose: a healthy run of any preset stays silent.
"""

import argparse
import math
import sys

from nanoalign.record import read_metrics

TUTORIAL = "tutorials/{}#healthy-and-unhealthy-curves"
PPO, DPO = TUTORIAL.format("04-ppo.md"), TUTORIAL.format("05-dpo.md")


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def series(rows: list[dict], key: str) -> list[float]:
    """The numeric values of `key` in the rows that have it."""
    return [r[key] for r in rows if isinstance(r.get(key), (int, float))]


def diagnose(rows: list[dict]) -> list[tuple[str, str]]:
    """(signature, explanation) of each failure signature that the last row, read with the rows
    before it, shows."""
    row, found = rows[-1], []
    number = lambda key: row[key] if isinstance(row.get(key), float) else None
    losses = [v for k, v in row.items() if k.endswith("loss") and isinstance(v, float)]
    if not all(math.isfinite(v) for v in losses):
        found.append(("non-finite loss", "the loss is NaN or inf: the learning rate is too "
                      "high. The checkpoint on disk is from before it. Lower --lr, or use "
                      "float32."))
    kl = number("kl")
    if kl is not None and kl < -1.0:  # the mean of k1 over samples of pi cannot be clearly < 0
        found.append(("negative KL", "the sampled KL to the reference is clearly negative: the "
                      "log-probs are not those of the sampling distribution (temperature, "
                      f"top-k/top-p). See {PPO}"))
    if kl is not None and kl > 50.0:
        found.append(("exploding KL", f"the policy is {kl:.0f} nats from the reference: beta too "
                      f"small or lr too high, and the reward model is being exploited. See {PPO}"))
    if number("entropy") is not None and row["entropy"] < 0.05:
        found.append(("entropy collapse", "the policy is nearly deterministic: every answer looks "
                      f"the same and RL has nothing left to compare. See {PPO}"))
    ends = series(rows[-50:], "end_rate") if "end_rate" in row else []
    if len(ends) >= 4 and max(ends[:-3]) > 0.5 and max(ends[-3:]) == 0.0:
        found.append(("no end token", "no answer emits <|end|> any more: the policy learned to "
                      f"ramble. See {PPO}"))
    chosen = series(rows, "logps/chosen") if "logps/chosen" in row else []
    rejected = series(rows, "logps/rejected") if "logps/rejected" in row else []
    if len(chosen) >= 10 and len(rejected) >= 10:
        c0, c1 = mean(chosen[:5]), mean(chosen[-5:])
        r0, r1 = mean(rejected[:5]), mean(rejected[-5:])
        # log-probs are negative: chosen lost a quarter of its log-prob, and rejected fell too
        if c1 < 1.25 * c0 and r1 < r0:
            found.append(("DPO log-probs collapsing", f"log p(chosen) {c0:.1f} -> {c1:.1f} and "
                          f"log p(rejected) {r0:.1f} -> {r1:.1f}: both answers lose probability, a "
                          "known DPO failure (raise --beta, lower --lr, or use --label_smoothing). "
                          f"See {DPO}"))
    score_before, score_now = series(rows[-20:-10], "score"), series(rows[-10:], "score")
    gold_before, gold_now = series(rows[-20:-10], "gold"), series(rows[-10:], "gold")
    windows_full = len(rows) >= 20 and {len(score_before), len(score_now), len(gold_before),
                                        len(gold_now)} == {10}
    if "gold" in row and windows_full and mean(score_now) > mean(score_before) + 0.1 \
            and mean(gold_now) < mean(gold_before) - 0.1:
        found.append(("over-optimisation", "the reward rises while the gold judge's score falls: "
                      "the policy is exploiting the reward model. Raise --kl_coef or stop earlier. "
                      f"See {PPO}"))
    if row.get("tokens_per_s") == 0:
        found.append(("no trainable tokens", "a step had no answer tokens to train on: every "
                      "answer was truncated away? Raise --max_len or shorten the prompts."))
    return found


def examine(path: str) -> list[str]:
    """Every signature a metrics file shows, once each, at the first row that shows it."""
    rows, seen, findings = read_metrics(path), set(), []
    for k in range(1, len(rows) + 1):
        for name, message in diagnose(rows[:k]):
            if name not in seen:
                seen.add(name)
                step = rows[k - 1].get("step", rows[k - 1].get("iter"))
                findings.append(f"[doctor] {path}, step {step}: {name}: {message}")
    return findings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files of stages")
    args = parser.parse_args(argv)
    findings = [line for path in args.metrics for line in examine(path)]
    for line in findings:
        print(line, file=sys.stderr)
    if not findings:
        print("[doctor] no failure signature found")
    return len(findings)


if __name__ == "__main__":
    sys.exit(main())
