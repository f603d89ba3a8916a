"""Smoke test of the benchmark on micro sizes. Timings are never asserted: they depend on the
machine."""

import json
import math
import sys

import pytest

from nanoalign import bench, benchkit
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


FAKE_PEER = '''
import argparse, json, os
ap = argparse.ArgumentParser()
ap.add_argument("--stage", nargs="*")
ap.add_argument("--results")
ap.add_argument("--data")
ap.add_argument("--work")
a = ap.parse_args()
with open(os.environ["PEER_CALLS"], "a") as f:  # who ran when, and with which stages
    f.write(json.dumps({"stages": a.stage}) + "\\n")
n = sum(1 for _ in open(os.environ["PEER_CALLS"]))
runs = {"rm": {"pairs_per_s": 10.0 * n, "versions": {"trl": "9.9"}},
        "raw": {"tokens_per_s": 1000.0 * n},
        # TRL >= 1.13 has no PPO trainer: the stage reports an error and no figure
        "ppo": {"rollouts_per_s": 5.0} if os.environ.get("PEER_PPO") else {"error": "gone"}}
json.dump({"stages": {s: {"runs": [runs[s]]} for s in a.stage}}, open(a.results, "w"))
'''


def test_peers_side_by_side_alternates_and_takes_each_ratio_within_its_round(tmp_path, capsys,
                                                                             monkeypatch):
    script, calls = tmp_path / "peer.py", tmp_path / "calls.jsonl"
    script.write_text(FAKE_PEER)
    monkeypatch.setenv("PEER_CALLS", str(calls))
    order, real_run = [], bench.run
    monkeypatch.setattr(bench, "run", lambda args: order.append("ours") or real_run(args))
    real_peer = benchkit.run_peer
    monkeypatch.setattr(benchkit, "run_peer", lambda *a: order.append("trl") or real_peer(*a))
    result = bench.main(["--quick", "--only", "pretrain,rm", "--rounds", "3", "--peer_python",
                         sys.executable, "--peer_script", str(script)])
    assert order == ["ours", "trl", "trl", "ours", "ours", "trl"]  # A B, B A, A B
    assert [json.loads(line)["stages"] for line in open(calls)] == [["raw", "rm"]] * 3
    table = {row["item"]: row for row in result["table"]}
    assert set(table) == {"pretrain fp32", "rm"}  # bf16 has no peer figure
    assert table["rm"]["trl"] == [10.0, 20.0, 30.0]  # the peer's n-th process: 10 n pairs/s
    for row in table.values():  # ours / the peer's, round by round
        assert row["ratio"] == [o / t for o, t in zip(row["ours"], row["trl"])]
    out = capsys.readouterr().out
    assert "TRL 9.9" in out and "ratio" in out and "for reference only" not in out


def test_ppo_sits_beside_a_peer_that_has_a_ppo_trainer_and_only_then(tmp_path, monkeypatch):
    script = tmp_path / "peer.py"
    script.write_text(FAKE_PEER)
    monkeypatch.setenv("PEER_CALLS", str(tmp_path / "calls.jsonl"))
    argv = ["--quick", "--only", "ppo", "--rounds", "1", "--peer_python", sys.executable,
            "--peer_script", str(script)]
    assert bench.main(argv)["table"] == []  # the newest TRL: no figure, so no ratio
    monkeypatch.setenv("PEER_PPO", "1")  # TRL 1.12
    (row,) = bench.main(argv)["table"]
    assert row["item"] == "ppo" and row["trl"] == [5.0]
    assert row["ratio"] == [row["ours"][0] / 5.0]


def test_without_a_peer_python_trl_is_a_reference_line_and_never_a_ratio(capsys):
    bench.main(["--quick", "--peers", "--only", "rm"])
    out = capsys.readouterr().out
    assert "for reference only" in out and "no ratio" in out and "x " not in out.split("\n")[-1]
    with pytest.raises(SystemExit, match="no such file"):
        bench.main(["--quick", "--peer_python", sys.executable, "--peer_script", "/no/such.py"])


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the folder is not a package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_scripts_run_and_print_their_figures(capsys):
    # what docs/speed.md quotes from each script; no timing is asserted, only that each prints it
    load_benchmark("decode_floor").main(["--batches", "2", "--top", "3"])
    out = capsys.readouterr().out
    assert "batch 2:" in out and "profiled self time: " in out and "x the read" in out
    load_benchmark("profile_step").main(["--batch", "2", "--seq", "16", "--n_layer", "1",
                                         "--n_embd", "32", "--vocab", "64", "--steps", "2"])
    out = capsys.readouterr().out
    shares = [float(line.split()[-1].rstrip("%")) for line in out.splitlines()[1:]]
    assert "MFU" in out and "matmul" in out and abs(sum(shares) - 100) < 0.5
    load_benchmark("generate_ab").main(["--base", "HEAD", "--batches", "2", "--new", "8",
                                        "--rounds", "1", "--repeats", "1", "--kv_batches", "2"])
    out = capsys.readouterr().out
    assert out.count("B/A") == 3 and "KV cache vs none, batch 2" in out
