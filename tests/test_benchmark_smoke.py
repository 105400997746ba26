"""scripts/benchmark.py on its smallest CPU settings: every row runs, the JSON has its keys, outputs that must be
identical are compared (and a difference aborts); scripts/gpu_check.sh --dry-run checks its plan. No timing is
asserted: these settings are far too small for the numbers to mean anything."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_cpu_run_writes_every_row(tmp_path):
    bench = _benchmark_module()
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--size", "tiny", "--quick", "--out", str(out), "--workdir", str(tmp_path / "w")])
    report = json.loads(out.read_text())
    assert set(report) >= {"meta", "rows", "targets", "extrapolated", "profile_top_ops"}
    meta = report["meta"]
    assert meta["gpu_measured"] is False and "4·N" in meta["mfu_formula"] and meta["load_average_before"]
    names = [r["name"] for r in report["rows"]]
    for expected in ("train: encoder passes per image (S-sample VIB)", "train: padding", "train: LLM attention",
                     "train: precision", "data: training images decoded + augmented", "POPE: batching",
                     "POPE: prompt-length sort", "POPE: feature cache, first evaluation",
                     "POPE: feature cache, later evaluations", "POPE: KV cache"):
        assert expected in names
    assert any(n.startswith("CHAIR: batching") for n in names)
    vcd = {r["name"]: r for r in report["rows"] if r["name"].startswith("VCD")}
    assert set(vcd) == {"VCD: throughput vs greedy", "VCD: latency vs greedy (batch 1)", "VCD: batching"}
    assert vcd["VCD: batching"]["identical"] is True and vcd["VCD: batching"]["compared"] > 0
    assert report["vcd"]["throughput_cost_x"] > 0 and report["vcd"]["latency_cost_x"] > 0
    opera = {r["name"]: r for r in report["rows"] if r["name"].startswith("OPERA")}
    assert set(opera) == {"OPERA: throughput vs greedy", "OPERA: latency vs greedy (batch 1)", "OPERA: batching",
                          "OPERA: throughput vs beam search (5 beams)",
                          "OPERA: latency vs beam search (5 beams) (batch 1)"}
    assert opera["OPERA: batching"]["identical"] is True and opera["OPERA: batching"]["compared"] > 0
    assert all(cost["throughput_cost_x"] > 0 and cost["latency_cost_x"] > 0
               for cost in report["opera"]["cost_x_by_baseline"].values())
    for row in report["rows"]:
        assert set(row) >= {"name", "metric", "optimized", "baseline", "speedup", "identical"}
        if row["name"].startswith(("POPE", "CHAIR")):
            assert row["identical"] is True and row["compared"] > 0, row["name"]
        if row["baseline"] is not None:
            assert row["speedup"] > 0
    assert report["rows"][names.index("train: precision")]["baseline"] is None  # GPU only
    train = report["rows"][0]["optimized"]
    assert train["samples_per_s"] > 0 and train["tokens_per_s"] > train["samples_per_s"] and train["peak_mb"] > 0
    assert report["extrapolated"]["mfu"] is None  # no accelerator peak on a CPU
    assert report["targets"] == {}  # --quick: the CPU targets are not judged on meaningless timings
    assert "| row | metric |" in out.with_suffix(".md").read_text()
    assert "self_cpu_time_total" in (tmp_path / "bench_profile.txt").read_text()


def test_different_outputs_abort_the_run():
    from minigpt4.benchmarking.measure import Report

    report = Report(strict_identical=True)
    report.add("same", "q/s", {"v": 2.0}, {"v": 1.0}, "v", optimized_label="a", baseline_label="b",
               answers=({"1": "yes", "2": "no"}, {"1": "yes", "2": "no"}))
    assert report.rows[0]["identical"] and report.rows[0]["speedup"] == 2.0
    with pytest.raises(AssertionError, match="outputs differ for 1 of 2"):
        report.add("differs", "q/s", {"v": 2.0}, {"v": 1.0}, "v", optimized_label="a", baseline_label="b",
                   answers=({"1": "yes", "2": "no"}, {"1": "yes", "2": "yes"}))
    lenient = Report(strict_identical=False)  # GPU bf16: recorded as an agreement rate instead
    row = lenient.add("differs", "q/s", {"v": 2.0}, {"v": 1.0}, "v", optimized_label="a", baseline_label="b",
                      answers=({"1": "yes", "2": "no"}, {"1": "yes", "2": "yes"}))
    assert row["identical"] is False and row["agreement"] == 0.5


def test_gpu_check_dry_run_checks_the_plan(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "gpu_check_summary.json").read_text())
    assert summary["dry_run"] is True
    assert [s["name"] for s in summary["steps"]] == ["gpu_tests", "benchmark_7b", "fullsize_7b", "benchmark_7b_lowres"]
    assert sum(s["limit_s"] for s in summary["steps"]) <= 480  # the check must fit in 8 minutes
    imports = json.loads((tmp_path / "out" / "imports.json").read_text())
    assert imports["missing_required"] == [] and "torch" in imports["found"]
    bad = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
