"""Smoke test of the benchmark on micro sizes. Timings are never asserted: they depend on the machine (GUIDE.md 4)."""

import json
import math

from nanoalign import bench


def test_bench_quick_measures_every_stage_and_prints_one_json_object(capsys):
    bench.main(["--quick", "--json"])
    result = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout, progress on stderr
    rows = {r["item"]: r for r in result["rows"]}
    assert set(rows) >= {"pretrain fp32", "pretrain bf16 autocast", "generate cache greedy", "generate cache sampled",
                         "generate no-cache sampled", "sft", "rm", "dpo", "ppo", "grpo", "choice: exact GELU",
                         "choice: fused AdamW", "choice: no mask, SFT", "choice: no mask, RM"}
    for r in rows.values():
        assert r["ms"] > 0 and math.isfinite(r["rate"]) and r["rate"] > 0 and r["peak_mem_mb"] > 0, r
        assert "trl" not in r  # TRL's figures only sit beside runs at the peer sizes
    assert 0 < rows["pretrain fp32"]["mfu"] and 0 < rows["sft"]["mfu"]
    assert set(rows["ppo"]["split_ms"]) == set(rows["grpo"]["split_ms"]) == {"generate", "score", "update"}
    assert all(x > 0 for x in result["probe_gflops_before_after"]) and result["peak"]["fp32_gflops"] > 0
    for key in ("choice: exact GELU", "choice: fused AdamW", "choice: no mask, SFT", "choice: no mask, RM"):
        # rate = the alternative's median time over the choice's, both timed call by call in turn
        assert len(rows[key]["times_ms"]) == 2 * bench.QUICK["repeats"] and "ms" in rows[key]["note"]

    # at the peer sizes a row carries TRL's figure for the same item
    peers = bench.Bench(bench.BenchConfig(warmup=0, repeats=1), "cpu", True, [])
    peers.item("sft", lambda: None, 100, "tok/s", tokens=100)
    assert peers.rows[0]["trl"]["rate"] == bench.TRL["sft"][0]
    result["rows"].append(peers.rows[0] | {"mfu": None})
    bench.print_table(result)
    table = capsys.readouterr().out
    assert all(name in table for name in rows) and "TRL" in table
