"""python -m nanoalign.plot: any runs' metrics in one PNG, smoothed, with the reference lines."""

import json
import math

import pytest

from nanoalign import plot


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


def test_plot_overlays_runs_and_draws_their_values(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows_a = [{"iter": i, "score": float(i), "kl": 0.1 * i} for i in range(1, 6)]
    rows_b = [{"iter": i, "score": -float(i)} for i in range(1, 6)]
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
    assert list(raw.get_ydata()) == [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert list(smoothed.get_ydata()) == pytest.approx(plot.smooth(raw.get_ydata(), 0.5))
    assert not plot.draw(ax, rows_b, "kl", "b", "red", 0.5)  # b has no kl: nothing drawn
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
