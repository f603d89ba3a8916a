"""
Plot any runs' metrics side by side: one panel per metric, one colour per run, the raw values
thin and faint and an exponential moving average on top, with the reference lines we know.

    python -m nanoalign.plot out/tiny/ppo out/tiny/grpo --keys score,gold,kl --out ppo_grpo.png
    python -m nanoalign.plot out/tiny --out tiny.png          # every stage of a pipeline run
    python -m nanoalign.plot my_run/metrics.jsonl --keys loss --smooth 0

Each path is a metrics.jsonl file, a stage's folder holding one, or a run's folder whose stage
folders hold them. The x axis is the row's "step" (or "iter" for PPO and GRPO). Reference lines:
  loss of pretraining    the world's entropy floor and the unigram entropy (from the rows)
  loss of RM and DPO     log 2: the pairwise loss of a model that cannot tell the answers apart
                         (DPO starts there, since the policy equals the reference)
  accuracies             0.5, a coin flip
  ratio                  1: the new policy equals the one that sampled
"""

import argparse
import math
import os

from nanoalign import record

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
    if key in ("loss", "val_loss") and "entropy_floor" in last:
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
    if weight > 0 and len(ys) > 2:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(ys, weight), color=color, label=label)
    else:
        ax.plot(xs, ys, color=color, label=label, marker="." if len(xs) < 20 else None)
    return True


def plot(paths: list[str], keys: list[str] | None, out: str, weight: float = 0.8) -> list[str]:
    """Write the PNG; returns the keys drawn (the panels)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    runs = [(label, record.read_metrics(f)) for p in paths for label, f in find_metrics(p)]
    present = {k for _, rows in runs for r in rows for k in r}
    keys = keys or [k for k in DEFAULT_KEYS if k in present]
    missing = [k for k in keys if k not in present]
    if missing or not keys:
        numeric = sorted({k for _, rows in runs for r in rows for k, v in r.items()
                          if isinstance(v, (int, float))})
        raise SystemExit(f"--keys: no run has {missing or 'any default metric'}; they have "
                         f"{', '.join(numeric)}")
    cols = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, squeeze=False,
                             figsize=(4.2 * cols, 3.2 * math.ceil(len(keys) / cols)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        refs = {}
        for i, (label, rows) in enumerate(runs):
            if draw(ax, rows, key, label, colors[i % len(colors)], weight):
                refs.update({y: name for y, name in reference_lines(key, rows)})
        for y, name in refs.items():
            ax.axhline(y, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(name, (0, y), xycoords=("axes fraction", "data"), fontsize=7,
                        color="grey", va="bottom")
        ax.set_title(key)
        ax.set_xlabel("step or iteration")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return keys


def main(argv=None):
    p = argparse.ArgumentParser(description="Overlay the metrics of any runs in one PNG.",
                                epilog="e.g. python -m nanoalign.plot out/a/ppo out/b/ppo "
                                       "--keys score,kl --out ppo.png")
    p.add_argument("paths", nargs="+", help="metrics.jsonl files, stage folders or run folders")
    p.add_argument("--keys", default="", help="comma-separated metrics, one panel each "
                   f"(default: those of {','.join(DEFAULT_KEYS)} that the runs have)")
    p.add_argument("--out", default="plot.png", help="the PNG to write")
    p.add_argument("--smooth", type=float, default=0.8,
                   help="moving-average weight in [0, 1); 0 draws the raw values only")
    args = p.parse_args(argv)
    if not 0 <= args.smooth < 1:
        p.error(f"--smooth must be in [0, 1), got {args.smooth}")
    keys = plot(args.paths, [k for k in args.keys.split(",") if k], args.out, args.smooth)
    print(f"{args.out}: {', '.join(keys)}")


if __name__ == "__main__":
    main()
