"""
Plot any runs' metrics side by side: one panel per metric, one colour per run, the raw values
thin and faint and an exponential moving average on top, with the reference lines we know.

    python -m nanoalign.plot out/tiny/ppo out/tiny/grpo --keys score,gold,kl --out ppo_grpo.png
    python -m nanoalign.plot out/tiny --out tiny.png          # every stage of a pipeline run
    python -m nanoalign.plot out/tiny/dpo --keys rewards/margins,logps/chosen+logps/rejected
    python -m nanoalign.plot my_run/metrics.jsonl --keys loss --smooth 0
    python -m nanoalign.plot --reward_model out/tiny/rm/ckpt.pt --pairs data/world/prefs_val.jsonl

Each path is a metrics.jsonl file, a stage's folder holding one, or a run's folder whose stage
folders hold them. The x axis is the row's "step" (or "iter" for PPO and GRPO). "a+b" draws the
metrics a and b on one panel. Reference lines:
  loss of pretraining    the world's entropy floor and the unigram entropy (from the rows)
  loss of RM and DPO     log 2: the pairwise loss of a model that cannot tell the answers apart
                         (DPO starts there, since the policy equals the reference)
  accuracies, ratio      0.5, a coin flip; 1, the new policy equals the one that sampled
--pairs (pairs with gold scores, as the world writes them) draws the reward model instead: its
agreement with the judge by gold margin and kind of pair beside the labels' own, and P(chosen) =
sigmoid(r_c - r_r) against the gold margin beside the annotators' sigmoid(margin / tau), which a
perfect Bradley-Terry fit of their labels would learn. --report draws a pipeline's report.json:
every model's gold score against its KL to SFT, the price each method paid for its gain.
"""

import argparse
import math
import os

from nanoalign import agreement, record, world

# the metrics worth a first look, in panel order; --keys picks others
DEFAULT_KEYS = ["loss", "val_loss", "accuracy", "val_accuracy", "rewards/margins", "score",
                "gold", "kl"]
ACCURACIES = ("accuracy", "val_accuracy", "rewards/accuracies", "gold_agreement")


def find_metrics(path: str) -> list[tuple[str, str]]:
    """(label, metrics.jsonl path) for a metrics file, a stage folder or a run folder."""
    if os.path.isfile(path):
        folder = os.path.dirname(os.path.abspath(path))
        return [(os.path.basename(folder), path)]
    own = os.path.join(path, "metrics.jsonl")
    if os.path.isfile(own):
        return [(label_of(path), own)]
    stages = sorted(d for d in os.listdir(path) if os.path.isfile(
        os.path.join(path, d, "metrics.jsonl"))) if os.path.isdir(path) else []
    if not stages:
        raise SystemExit(f"{path}: expected a metrics.jsonl file, or a folder holding one or "
                         "holding stage folders that do; found none")
    return [(label_of(os.path.join(path, s)), os.path.join(path, s, "metrics.jsonl"))
            for s in stages]


def label_of(folder: str) -> str:
    """"tiny/ppo" for out/tiny/ppo: enough to tell two runs' stages apart."""
    parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)
    return "/".join(parts[-2:])


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(x, y) of the rows that have this metric (evaluation rows have more keys than others)."""
    pts = [(r.get("step", r.get("iter")), r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [x for x, _ in pts], [y for _, y in pts]


def smooth(ys: list[float], weight: float) -> list[float]:
    """Exponential moving average, debiased (as TensorBoard does) so the first points are not
    pulled towards 0: s_t = w s_(t-1) + (1 - w) y_t, divided by 1 - w^t."""
    out, s = [], 0.0
    for t, y in enumerate(ys, 1):
        s = weight * s + (1 - weight) * y
        out.append(s / (1 - weight ** t) if weight > 0 else y)
    return out


def reference_lines(key: str, rows: list[dict]) -> list[tuple[float, str]]:
    """(y, label) of the known reference values for this metric of these rows."""
    last = {k: v for r in rows for k, v in r.items()}  # the latest value of every column
    lines = []
    if key in ("loss", "val_loss") and last.get("entropy_floor") is not None:
        lines += [(last["entropy_floor"], "entropy floor"),
                  (last["unigram_entropy"], "unigram entropy")]
    pairwise = "rewards/margins" in last or "margin" in last  # DPO's and the RM's rows
    if key in ("loss", "val_loss") and pairwise:
        lines.append((math.log(2), "log 2"))
    if key in ACCURACIES:
        lines.append((0.5, "chance"))
    if key == "ratio":
        lines.append((1.0, "ratio 1"))
    return lines


def draw(ax, rows: list[dict], key: str, label: str, color, weight: float) -> bool:
    """One run's metric on one panel: raw values faint, the smoothed curve solid."""
    xs, ys = series(rows, key)
    if not xs:
        return False
    if weight > 0 and len(ys) >= 10:  # shorter series (evaluation rows): points, unsmoothed
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(ys, weight), color=color, label=label)
    else:
        ax.plot(xs, ys, color=color, label=label, marker="o" if len(xs) < 20 else None,
                markersize=3)
    return True


def figure(n_panels: int, cols: int = 3, width=4.2, height=3.0):
    """A grid of n_panels axes (the spare ones hidden) on a non-interactive backend."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    cols = min(cols, n_panels)
    width, height = (6, 4) if n_panels == 1 else (width, height)  # one panel: larger
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(width * cols, height * rows))
    for ax in list(axes.flat)[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat)[:n_panels]


def save(fig, out: str, title: str = ""):
    import matplotlib.pyplot as plt
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def draw_panels(panels: list, out: str, weight: float = 0.8, title: str = "", cols: int = 3,
                logy: bool = False):
    """panels: [(panel title, [(label, rows, key), ...])], one panel each, every curve with the
    reference lines of its rows."""
    import matplotlib.pyplot as plt
    fig, axes = figure(len(panels), 2 if len(panels) == 4 else cols)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, curves) in zip(axes, panels):
        refs = {}
        for i, (label, rows, key) in enumerate(curves):
            if draw(ax, rows, key, label, colors[i % len(colors)], weight):
                refs.update({y: line for y, line in reference_lines(key, rows)})
        for y, line in refs.items():
            ax.axhline(y, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(line, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7,
                        color="grey", va="bottom")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("iteration" if any("iter" in r for r in curves[0][1][:1]) else "step")
        ax.legend(fontsize=7)
        if logy:  # plain numbers (0.6, 2) at the ticks, not powers of 10
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter("{x:g}")
            ax.yaxis.set_minor_formatter("{x:g}")
    save(fig, out, title)


def plot(paths: list[str], keys: list[str] | None, out: str, weight: float = 0.8,
         title: str = "", logy: bool = False) -> list[str]:
    """Write the PNG; returns the keys drawn (the panels; "a+b" is one panel)."""
    runs = [(label, record.read_metrics(f)) for p in paths for label, f in find_metrics(p)]
    present = {k for _, rows in runs for r in rows for k in r}
    keys = keys or [k for k in DEFAULT_KEYS if k in present]
    missing = [k for spec in keys for k in spec.split("+") if k not in present]
    if missing or not keys:
        numeric = sorted({k for _, rows in runs for r in rows for k, v in r.items()
                          if isinstance(v, (int, float))})
        raise SystemExit(f"--keys: no run has {missing or 'any default metric'}; they have "
                         f"{', '.join(numeric)}")
    # a curve is named by its run, its metric or both, as its panel needs
    name = lambda run, k, n: run if n == 1 else k if len(runs) == 1 else f"{run} {k}"
    panels = [(spec.replace("+", ", "), [(name(label, k, spec.count("+") + 1), rows, k)
                                         for label, rows in runs for k in spec.split("+")])
              for spec in keys]
    draw_panels(panels, out, weight, title, logy=logy)
    return keys


# ---------------------------------------------------------------- the reward model on pairs
def score_pairs(rm_path: str, pairs_path: str) -> dict:
    """The reward model's score difference r_c - r_r on every pair of the file, with the pairs'
    gold margins and kinds (world.pair_kind); the file's pairs need gold_chosen/gold_rejected."""
    from nanoalign import batching, data, evaluate, rl  # torch: only here
    records = data.load_prefs(pairs_path)
    if not all("gold_chosen" in r for r in records):
        raise SystemExit(f"--pairs {pairs_path}: its pairs carry no gold scores (gold_chosen, "
                         "gold_rejected), as the world's prefs_val.jsonl does")
    rm = rl.load_reward_model(rm_path)
    tok = record.checkpoint_tokenizer(record.load_checkpoint(rm_path))
    pairs = batching.tokenize_all(batching.tokenize_pref, tok, records, rm[0].config.block_size)
    chosen, rejected = evaluate.pair_rm_scores(rm, pairs, tok.pad_id, "cpu").T.tolist()
    return {"diff": [c - r for c, r in zip(chosen, rejected)],
            "margin": [r["gold_chosen"] - r["gold_rejected"] for r in records],
            "kind": [world.pair_kind(rl.prompt_text(r["prompt"]), r["chosen"], r["rejected"])
                     for r in records]}


def plot_pairs(rm_path: str, pairs_path: str, out: str, title: str = "") -> dict:
    """Three panels: agreement by |gold margin| bucket, by kind of pair, and calibration."""
    s = score_pairs(rm_path, pairs_path)
    m, d = s["margin"], s["diff"]
    by = {"|gold margin|": agreement.by_group([agreement.bucket_of(abs(x)) for x in m], m, d),
          "kind of pair": agreement.by_group(s["kind"], m, d)}
    fig, axes = figure(3, 3, width=4.6, height=3.4)
    bars = [("rm_gold", "RM agrees with gold"), ("rm_labels", "RM agrees with labels"),
            ("labels_gold", "labels agree with gold")]
    for ax, (what, rows) in zip(axes, by.items()):
        names = sorted(rows, key=lambda g: (float(g.split("-")[0]) if what[0] == "|" else g))
        for i, (k, label) in enumerate(bars):
            ax.bar([j + (i - 1) * 0.27 for j in range(len(names))], [rows[g][k] for g in names],
                   width=0.27, label=label)
        ax.set_xticks(range(len(names)), [f"{g}\n(n={rows[g]['n']})" for g in names],
                      fontsize=7)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set(ylim=(0.3, 1.3), title=f"agreement by {what}")  # room above bars for the legend
        ax.legend(fontsize=7, loc="upper left")
    ax = axes[2]
    ax.scatter(m, [world.sigmoid(x) for x in d], s=3, alpha=0.15, color="tab:blue")
    bins = agreement.calibration(m, d)
    ax.plot([b["margin"] for b in bins], [b["p_chosen"] for b in bins], "o-", color="tab:blue",
            label="reward model, binned")
    world_json = os.path.join(os.path.dirname(os.path.abspath(pairs_path)), "world.json")
    tau = record.read_json(world_json).get("annotator_tau") if os.path.exists(world_json) else None
    if tau:
        xs = [x / 50 for x in range(-100, 101)]
        ax.plot(xs, [world.sigmoid(x / tau) for x in xs], color="black", linewidth=1,
                label=f"annotators: sigmoid(m / {tau:g})")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlim=(-2, 2), xlabel="gold margin m (chosen minus rejected)",
           ylabel="P(chosen) = sigmoid(r_c - r_r)", title="calibration")
    ax.legend(fontsize=7)
    save(fig, out, title)
    return by | {"calibration": bins}


# ---------------------------------------------------------------- the models of a run
def plot_report(path: str, out: str, title: str = "") -> list[str]:
    """Each evaluated model of report.json as a point: gold score against KL to SFT (nats per
    answer), with its win rate vs SFT: where online DPO lands beside offline DPO, a student
    beside its teacher, on the plane of the sweep's frontier. The pretrained base model, tens of
    nats away and never trained to answer, is left out so that the others can be told apart."""
    stages = record.read_json(path)["stages"]
    names = [n for n, s in stages.items() if "kl_to_sft" in s and n != "base"]
    fig, (ax,) = figure(1)
    for n in names:
        s = stages[n]
        ax.scatter(s["kl_to_sft"], s["gold_score"], label=f"{n} ({s['win_rate_vs_sft']:.2f})")
    ax.set(xlabel="KL to SFT, nats per answer", ylabel="gold score")
    ax.legend(fontsize=8, title="model (win rate vs SFT)", title_fontsize=8)
    save(fig, out, title)
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="metrics.jsonl files, stage folders or run folders")
    p.add_argument("--keys", default="", help="comma-separated metrics, one panel each, a+b "
                   f"on one (default: those of {','.join(DEFAULT_KEYS)} that the runs have)")
    p.add_argument("--out", default="plot.png", help="the PNG to write")
    p.add_argument("--title", default="", help="a title above the panels")
    p.add_argument("--logy", action="store_true", help="logarithmic y axes")
    p.add_argument("--smooth", type=float, default=0.8,
                   help="moving-average weight in [0, 1); 0 draws the raw values only")
    p.add_argument("--pairs", default="", help="instead: preference pairs with gold scores...")
    p.add_argument("--reward_model", default="out/tiny/rm/ckpt.pt",
                   help="...scored by this reward model (with --pairs)")
    p.add_argument("--report", default="", help="instead: a pipeline's report.json")
    args = p.parse_args(argv)
    if not 0 <= args.smooth < 1:
        p.error(f"--smooth must be in [0, 1), got {args.smooth}")
    if not (args.paths or args.pairs or args.report):
        p.error("give a run, stage folder or metrics.jsonl (or --pairs, or --report)")
    drawn = (plot_pairs(args.reward_model, args.pairs, args.out, args.title) if args.pairs else
             plot_report(args.report, args.out, args.title) if args.report else
             plot(args.paths, [k for k in args.keys.split(",") if k], args.out, args.smooth,
                  args.title, args.logy))
    print(f"{args.out}: {', '.join(drawn)}")


if __name__ == "__main__":
    main()
