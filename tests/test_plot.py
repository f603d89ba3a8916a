"""python -m nanoalign.plot: any runs' metrics in one PNG, smoothed, with the reference lines."""

import json
import math

import pytest

from nanoalign import agreement, plot


def write_run(folder, rows):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_smoothing_is_debiased_and_zero_weight_keeps_the_raw_values():
    assert plot.smooth([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)  # no pull towards 0
    assert plot.smooth([1.0, 3.0], 0.0) == [1.0, 3.0]
    # by hand: s1 = 0.5 * 1 / (1 - 0.5) = 1; s2 = (0.5 * 0.5 + 0.5 * 3) / (1 - 0.25) = 7/3
    assert plot.smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, 7 / 3])


def test_reference_lines_come_from_what_the_rows_are():
    pretrain = [{"step": 1, "loss": 5.0}, {"step": 2, "val_loss": 1.0, "entropy_floor": 0.6,
                                          "unigram_entropy": 4.5}]
    assert plot.reference_lines("val_loss", pretrain) == [(0.6, "entropy floor"),
                                                          (4.5, "unigram entropy")]
    dpo = [{"step": 1, "loss": 0.69, "rewards/margins": 0.0}]
    assert plot.reference_lines("loss", dpo) == [(math.log(2), "log 2")]
    assert plot.reference_lines("loss", [{"step": 1, "loss": 2.0}]) == []  # SFT: none known
    assert plot.reference_lines("ratio", [{"iter": 1, "ratio": 1.0}]) == [(1.0, "ratio 1")]
    # a pretraining run without the generator's log-probs has no floor (and draws no line at None)
    assert plot.reference_lines("val_loss", [{"step": 1, "val_loss": 1.0, "entropy_floor": None,
                                             "unigram_entropy": 4.5}]) == []


def test_plot_overlays_runs_and_draws_their_values(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows_a = [{"iter": i, "score": float(i), "kl": 0.1 * i} for i in range(1, 13)]
    rows_b = [{"iter": i, "score": -float(i)} for i in range(1, 13)]
    write_run(tmp_path / "a" / "ppo", rows_a)
    write_run(tmp_path / "b" / "grpo", rows_b)
    out = tmp_path / "cmp.png"
    plot.main([str(tmp_path / "a"), str(tmp_path / "b" / "grpo" / "metrics.jsonl"),
               "--keys", "score,kl", "--out", str(out)])
    assert out.stat().st_size > 1000
    # what draw puts on the axes: the raw values, then the smoothed curve
    fig, ax = plt.subplots()
    assert plot.draw(ax, rows_b, "score", "b", "red", 0.5)
    raw, smoothed = ax.lines
    assert list(raw.get_ydata()) == [-float(i) for i in range(1, 13)]
    assert list(smoothed.get_ydata()) == pytest.approx(plot.smooth(raw.get_ydata(), 0.5))
    assert not plot.draw(ax, rows_b, "kl", "b", "red", 0.5)  # b has no kl: nothing drawn
    # a few evaluation rows are drawn as they are: smoothing 4 points would invent a curve
    assert plot.draw(ax, rows_b[:4], "score", "b", "red", 0.5)
    assert list(ax.lines[-1].get_ydata()) == [-1.0, -2.0, -3.0, -4.0] and len(ax.lines) == 3
    plt.close(fig)


def test_a_run_folder_expands_to_its_stages_and_bad_input_is_named(tmp_path, capsys):
    write_run(tmp_path / "run" / "sft", [{"step": 1, "loss": 2.0}])
    write_run(tmp_path / "run" / "dpo", [{"step": 1, "loss": 0.69, "rewards/margins": 0.1}])
    found = plot.find_metrics(str(tmp_path / "run"))
    assert [label for label, _ in found] == ["run/dpo", "run/sft"]
    with pytest.raises(SystemExit, match="no run has .'nope'.; they have loss, rewards/margins"):
        plot.main([str(tmp_path / "run"), "--keys", "nope", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="expected a metrics.jsonl file"):
        plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])


@pytest.fixture
def drawn(monkeypatch):
    """The figure plot.py would save, kept open for inspection: [figure]."""
    figures = []
    monkeypatch.setattr(plot, "save", lambda fig, out, title="": figures.append(fig))
    return figures


def test_a_shared_panel_carries_both_metrics_and_the_reference_lines_of_their_rows(tmp_path,
                                                                                   drawn):
    rows = [{"step": s, "loss": 6.0 - s / 10} for s in range(1, 31)]
    rows[-1] |= {"val_loss": 3.2, "entropy_floor": 0.6, "unigram_entropy": 4.5}
    write_run(tmp_path / "run" / "pretrain", rows)
    assert plot.plot([str(tmp_path / "run" / "pretrain")], ["loss+val_loss"], "x.png",
                     title="t") == ["loss+val_loss"]
    (ax,) = [a for a in drawn[0].axes if a.get_visible()]
    assert ax.get_title() == "loss, val_loss"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "val_loss"]
    horizontal = sorted(line.get_ydata()[0] for line in ax.lines if len(set(line.get_ydata()))
                        == 1 and line.get_linestyle() == "--")
    assert horizontal == [0.6, 4.5]  # the entropy floor and the unigram entropy
    with pytest.raises(SystemExit, match="no run has .'nope'."):
        plot.plot([str(tmp_path / "run")], ["loss+nope"], "x.png")


def test_the_pipelines_training_curves_get_the_reference_lines(tmp_path, drawn):
    from nanoalign import report
    pre = [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 21)]
    pre[-1] |= {"val_loss": 3.1, "entropy_floor": 0.7, "unigram_entropy": 4.4}
    write_run(tmp_path / "pretrain", pre)
    write_run(tmp_path / "rm", [{"step": s, "loss": 0.69 - s / 100, "accuracy": 0.5 + s / 100,
                                 "margin": s / 10} for s in range(1, 21)])
    report.plot_run(str(tmp_path))
    axes = {a.get_title(): a for a in drawn[0].axes if a.get_visible()}
    assert set(axes) == {"pretrain: loss, val_loss", "rm: loss", "rm: accuracy"}
    lines = {t: sorted(round(float(line.get_ydata()[0]), 4) for line in a.lines
                       if line.get_linestyle() == "--") for t, a in axes.items()}
    assert lines == {"pretrain: loss, val_loss": [0.7, 4.4], "rm: loss": [0.6931],
                     "rm: accuracy": [0.5]}


def test_agreement_and_calibration_count_by_hand():
    margins = [0.1, -0.1, 0.3, 1.5, 0.0]  # gold_chosen - gold_rejected; the last a gold tie
    diffs = [2.0, 1.0, -1.0, 0.0, 5.0]  # r_c - r_r; an RM tie (0.0) prefers the rejected
    groups = [agreement.bucket_of(abs(m)) for m in margins]
    assert groups == ["0-0.25", "0-0.25", "0.25-0.5", "1.0-inf", "0-0.25"]
    by = agreement.by_group(groups, margins, diffs)
    # 0-0.25: pair 1 RM and gold agree, pair 2 RM prefers the chosen, which gold ranks lower
    assert by["0-0.25"] == {"n": 2, "rm_gold": 0.5, "rm_labels": 1.0, "labels_gold": 0.5}
    assert by["0.25-0.5"] == {"n": 1, "rm_gold": 0.0, "rm_labels": 0.0, "labels_gold": 1.0}
    assert by["1.0-inf"]["rm_gold"] == 0.0  # the RM tie counts against it
    bins = agreement.calibration(margins[:4], diffs[:4], edges=[-1, 0, 0.5, 2])
    sig = lambda x: 1 / (1 + math.exp(-x))
    assert [(b["lo"], b["n"]) for b in bins] == [(-1, 1), (0, 2), (0.5, 1)]
    assert bins[1]["margin"] == pytest.approx(0.2)
    assert bins[1]["p_chosen"] == pytest.approx((sig(2.0) + sig(-1.0)) / 2)
    assert bins[2]["p_chosen"] == 0.5


def test_the_pairs_figure_agrees_with_the_rm_stages_own_gold_agreement(micro_run, tmp_path):
    """plot --pairs scores the same held-out pairs as the RM stage's final evaluation, so its
    agreement with the judge, overall and per margin bucket, is the stage's."""
    from nanoalign import record
    ckpt = str(micro_run / "rm" / "ckpt.pt")
    stage = record.load_checkpoint(ckpt)["metrics"]
    out = tmp_path / "rm.png"
    by = plot.plot_pairs(ckpt, str(micro_run / "world" / "prefs_val.jsonl"), str(out))
    buckets = by["|gold margin|"]
    n = sum(b["n"] for b in buckets.values())
    overall = sum(b["rm_gold"] * b["n"] for b in buckets.values()) / n
    assert overall == pytest.approx(stage["gold_agreement"], abs=1.01 / n)
    for name, b in buckets.items():
        assert b["rm_gold"] == pytest.approx(stage[f"gold_agreement_margin_{name}"],
                                             abs=1.01 / b["n"])
    assert sum(b["n"] for b in by["kind of pair"].values()) == n
    assert out.stat().st_size > 1000


def test_the_report_figure_puts_each_evaluated_model_at_its_kl_and_gold(tmp_path, monkeypatch):
    """plot --report: one point per model of report.json at (KL to SFT, gold score), labelled
    with its win rate; the base model (off the scale) and a stage without an evaluation are left
    out."""
    stages = {"base": {"gold_score": -1.4, "kl_to_sft": 72.8, "win_rate_vs_sft": 0.02},
              "sft": {"gold_score": 0.4, "kl_to_sft": 0.0, "win_rate_vs_sft": 0.5},
              "dpo": {"gold_score": 0.7, "kl_to_sft": 2.1, "win_rate_vs_sft": 0.66},
              "online_dpo": {"gold_score": 0.85, "kl_to_sft": 2.5, "win_rate_vs_sft": 0.76},
              "rm": {"gold_agreement": 0.79}}
    (tmp_path / "report.json").write_text(json.dumps({"stages": stages}))
    drawn = []
    monkeypatch.setattr(plot, "save", lambda fig, out, title="": drawn.append(fig))
    assert plot.main(["--report", str(tmp_path / "report.json")]) is None
    (ax,) = drawn[0].axes
    points = [tuple(c.get_offsets()[0]) for c in ax.collections]
    assert points == [(0.0, 0.4), (2.1, 0.7), (2.5, 0.85)]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["sft (0.50)", "dpo (0.66)", "online_dpo (0.76)"]
