"""Smoke test of the benchmark on micro sizes. Timings are never asserted: they depend on the
machine."""

import json
import math

from nanoalign import bench
from nanoalign.machine import machine_name


def test_bench_quick_measures_every_stage_and_prints_one_json_object(capsys):
    bench.main(["--quick", "--json"])
    # exactly one JSON object on stdout, progress on stderr
    result = json.loads(capsys.readouterr().out)
    rows = {r["item"]: r for r in result["rows"]}
    assert set(rows) == {"pretrain fp32", "pretrain bf16 autocast", "generate cache greedy",
                         "generate cache sampled", "generate cache 4x batch",
                         "generate no-cache sampled", "sft", "rm", "dpo", "ppo", "grpo"}
    for r in rows.values():
        assert r["ms"] > 0 and math.isfinite(r["rate"]) and r["rate"] > 0, r
        assert r["peak_mem_mb"] > 0, r
    assert 0 < rows["pretrain fp32"]["mfu"] and 0 < rows["sft"]["mfu"]
    splits = {"generate", "score", "update"}
    assert set(rows["ppo"]["split_ms"]) == set(rows["grpo"]["split_ms"]) == splits
    assert all(x > 0 for x in result["probe_gflops_before_after"])
    assert result["peak"]["fp32_gflops"] > 0
    assert result["machine"] == machine_name(result["device"]) and "threads" in result["machine"]

    bench.print_table(result)
    table = capsys.readouterr().out
    assert all(name in table for name in rows)


def test_bench_at_the_peer_sizes_sets_no_peer_figure_beside_ours(capsys):
    # a peer's figure may only come from a measurement in the same run: none is stored
    bench.main(["--quick", "--peers", "--json", "--only", "rm"])
    result = json.loads(capsys.readouterr().out)
    assert [r["item"] for r in result["rows"]] == ["rm"]
    assert all(set(r) == set(result["rows"][0]) for r in result["rows"])
    assert "trl" not in result["rows"][0] and not hasattr(bench, "TRL")
