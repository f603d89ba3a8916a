"""
Do the raters agree? Chance-corrected agreement over a labelling log (label.py's or serve.py's):

    cohen_kappa   for each two raters, over the pairs both judged: (p_o - p_e) / (1 - p_e), p_o the
                  share of those pairs judged alike, p_e the share expected by chance from each
                  rater's own rates (Cohen 1960)
    fleiss_kappa  all raters at once, when every pair has the same number of judgements m:
                  (mean P_i - sum_j p_j^2) / (1 - sum_j p_j^2), P_i the share of agreeing rater
                  pairs on pair i, p_j the share of all judgements in category j (Fleiss 1971)
    gold          on the built-in world (decisions that carry the judge's scores): the share of a
                  rater's A/B decisions that the gold judge makes too

A judgement is "first", "second" (which answer won, named the same way for every rater whatever
order each saw: by the pair's models, or by the answers' sorted texts for two samples of one
model) or "tie"; a skip is no judgement. Each rater's last decision on a pair counts.

A reward model is one more rater: by_group gives its agreement with the judge by gold margin or
kind of pair, and calibration its P(chosen) against the gold margin (plot.py --pairs draws both).
"""

import itertools
import math

from nanoalign import world
from nanoalign.files import read_jsonl


def judgement(d: dict) -> str | None:
    """'first', 'second' or 'tie' for one logged decision; None for a skip (or an old log line
    without the answers, for two samples of one model)."""
    if d["choice"] == "skip":
        return None
    if d["choice"] not in ("A", "B"):  # tie, or identical answers
        return "tie"
    won = 0 if d["choice"] == "A" else 1
    models = d.get("models") or [d["A"], d["B"]]
    if models[0] != models[1]:
        return "first" if (d["A"], d["B"])[won] == models[0] else "second"
    if "answers" not in d:
        return None
    return "first" if d["answers"][won] == min(d["answers"]) else "second"


def cohen_kappa(a: list, b: list) -> float | None:
    """Cohen's kappa of two raters' judgements of the same items (None: p_e = 1, undefined)."""
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    p_e = sum(a.count(c) * b.count(c) for c in set(a) | set(b)) / n ** 2
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


def fleiss_kappa(counts: list[dict]) -> float | None:
    """Fleiss' kappa from counts[i] = {category: raters who chose it on item i}, the same number
    m >= 2 of raters on every item (None: all judgements in one category, undefined)."""
    m, n = sum(counts[0].values()), len(counts)
    p_bar = sum(sum(c * c for c in row.values()) - m for row in counts) / (n * m * (m - 1))
    totals = {}
    for row in counts:
        for cat, c in row.items():
            totals[cat] = totals.get(cat, 0) + c
    p_e = sum((t / (n * m)) ** 2 for t in totals.values())
    return None if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def rater_agreement(path: str) -> dict:
    """Per rater: pairs judged and agreement with gold; Cohen's kappa of each two raters; Fleiss'
    kappa (or why not). path: the log, or the file whose <path>.log.jsonl it is."""
    log = path if path.endswith(".log.jsonl") else path + ".log.jsonl"
    judged, gold = {}, {}  # {pair: {rater: judgement}}, {rater: {pair: agrees with gold}}
    for _, d in read_jsonl(log):
        pair, rater = d.get("pair", f"prompt {d.get('prompt_index')}"), d.get("rater", "?")
        j = judgement(d)
        judged.setdefault(pair, {}).pop(rater, None)
        if j is not None:
            judged[pair][rater] = j
        gold.setdefault(rater, {}).pop(pair, None)  # as above: the last decision counts
        g = d.get("gold")
        if j in ("first", "second") and g and g[0] != g[1]:
            won = 0 if d["choice"] == "A" else 1
            gold[rater][pair] = g[won] > g[1 - won]
    raters = sorted({r for by in judged.values() for r in by})
    out = {"raters": {r: {"judged": sum(r in by for by in judged.values())} for r in raters}}
    for r, by_pair in gold.items():
        if by_pair:
            out["raters"][r].update(gold_agreement=sum(by_pair.values()) / len(by_pair),
                                    gold_n=len(by_pair))
    out["cohen_kappa"] = {}
    for r1, r2 in itertools.combinations(raters, 2):
        both = [by for by in judged.values() if r1 in by and r2 in by]
        kappa = cohen_kappa([by[r1] for by in both], [by[r2] for by in both]) if both else None
        out["cohen_kappa"][f"{r1} & {r2}"] = {"kappa": kappa, "n": len(both)}
    sizes = sorted({len(by) for by in judged.values() if by})
    why = ("fewer than two raters" if len(raters) < 2 else
           f"pairs have different numbers of raters ({sizes})" if len(sizes) > 1 else
           "one rater per pair" if sizes == [1] else "")
    rows = [{c: list(by.values()).count(c) for c in set(by.values())}
            for by in judged.values() if by]
    out["fleiss_kappa"] = None if why else fleiss_kappa(rows)
    out["fleiss_note"] = f"not computed: {why}" if why else f"{len(rows)} pairs x {sizes[0]} raters"
    return out


# ---------------------------------------------------------------- a reward model against the judge
# |gold margin| buckets of train_rm's gold agreement (world.py keeps its own copy: editing
# world.py changes the world's hash and so regenerates every world)
MARGIN_BUCKETS = [(0, 0.25), (0.25, 0.5), (0.5, 1.0), (1.0, math.inf)]
# calibration bins of the signed gold margin (chosen minus rejected): open at both ends
CALIBRATION_EDGES = [-math.inf] + [x / 4 for x in range(-6, 7)] + [math.inf]


def bucket_of(abs_margin: float) -> str:
    """"0.25-0.5" for a |gold margin| of 0.3: the names of train_rm's gold_agreement_margin_*."""
    return next(f"{lo}-{hi}" for lo, hi in MARGIN_BUCKETS if lo <= abs_margin < hi)


def by_group(groups: list[str], gold_margins: list[float], rm_diffs: list[float]) -> dict:
    """Per group: n, rm_gold (the RM ranks the pair as the gold judge does), rm_labels (the RM
    ranks the labelled chosen answer first: its accuracy) and labels_gold (the label agrees with
    the judge: the annotators' own agreement). Pairs the judge ties are left out; an RM tie
    prefers the rejected answer, as in the RM stage."""
    out = {}
    for g, m, d in zip(groups, gold_margins, rm_diffs, strict=True):
        if m == 0:
            continue
        out.setdefault(g, []).append({"rm_gold": (d > 0) == (m > 0), "rm_labels": d > 0,
                                      "labels_gold": m > 0})
    return {g: {"n": len(v)} | {k: sum(r[k] for r in v) / len(v) for k in v[0]}
            for g, v in out.items()}


def calibration(gold_margins: list[float], rm_diffs: list[float],
                edges: list[float] = CALIBRATION_EDGES) -> list[dict]:
    """The RM's P(chosen) = sigmoid(r_c - r_r) binned by the signed gold margin (chosen minus
    rejected): per non-empty bin [lo, hi) its n, mean margin and mean P(chosen)."""
    bins = []
    for lo, hi in zip(edges, edges[1:]):
        inside = [(m, d) for m, d in zip(gold_margins, rm_diffs, strict=True) if lo <= m < hi]
        if inside:
            bins.append({"lo": lo, "hi": hi, "n": len(inside),
                         "margin": sum(m for m, _ in inside) / len(inside),
                         "p_chosen": sum(world.sigmoid(d) for _, d in inside) / len(inside)})
    return bins
