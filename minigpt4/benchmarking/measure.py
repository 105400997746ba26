"""Timing, peak memory, interleaved repeats and the report of scripts/benchmark.py."""
from __future__ import annotations

import contextlib
import resource
from typing import Any, Callable

import torch

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 989.4,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.2}


# ---------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb(field: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """GPU: torch.cuda.max_memory_allocated. CPU: the process's resident-set high-water mark (VmHWM), reset on
    entry through /proc/self/clear_refs; where that is not allowed, ru_maxrss (lifetime peak, not reset)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self.base_mb, self.method = device, 0.0, 0.0, ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb, self.method = torch.cuda.memory_allocated(self.device) / 2**20, "cuda.max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM (reset per measurement)"
        except OSError:
            self.method = "ru_maxrss (process lifetime)"
        self.base_mb = _rss_mb("VmRSS") or 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method.startswith("VmHWM"):
            self.peak_mb = _rss_mb("VmHWM") or 0.0
        else:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def result(self) -> dict[str, Any]:
        return {"peak_mb": round(self.peak_mb, 1), "peak_delta_mb": round(self.peak_mb - self.base_mb, 1),
                "memory_method": self.method}


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()



def interleaved(runs: dict[str, Callable[[], tuple[Any, dict]]], repeats: int, key: str) -> dict[str, tuple]:
    """Run the variants in turn (A B C A B C ...) `repeats` times and keep each one's fastest run: on a shared
    machine the load drifts, and taking turns exposes every variant to the same drift."""
    best: dict[str, tuple] = {}
    for _ in range(repeats):
        for name, run_once in runs.items():
            out, stats = run_once()
            if name not in best or stats[key] > best[name][1][key]:
                best[name] = (out, stats)
    return {name: (out, {**stats, "best_of": repeats}) for name, (out, stats) in best.items()}


# ------------------------------------------------------------------------------------------------- report
class Report:
    def __init__(self, strict_identical: bool):
        self.rows: list[dict[str, Any]] = []
        self.strict = strict_identical

    def add(self, name: str, metric: str, optimized: dict, baseline: dict | None, key: str, *,
            optimized_label: str, baseline_label: str, answers: tuple[dict, dict] | None = None, note: str = ""):
        row: dict[str, Any] = {"name": name, "metric": metric, "optimized_label": optimized_label,
                               "baseline_label": baseline_label, "optimized": optimized, "baseline": baseline,
                               "speedup": None, "identical": None, "note": note}
        if baseline is not None and baseline.get(key):  # a baseline that failed (out of memory) has no rate
            row["speedup"] = optimized[key] / baseline[key]
        if answers is not None:
            ours, theirs = answers
            shared = sorted(set(ours) & set(theirs))
            same = sum(ours[k] == theirs[k] for k in shared)
            row["identical"] = same == len(shared) and len(shared) > 0
            row["agreement"] = same / max(len(shared), 1)
            row["compared"] = len(shared)
            row["nonempty"] = sum(bool(ours[k]) for k in shared) / max(len(shared), 1)  # not a trivial comparison
            if self.strict and not row["identical"]:
                bad = [k for k in shared if ours[k] != theirs[k]][:3]
                raise AssertionError(f"{name}: outputs differ for {len(shared) - same} of {len(shared)} items, "
                                     f"e.g. {[(k, ours[k], theirs[k]) for k in bad]}")
        row["optimized_value"], row["baseline_value"] = optimized.get(key), (baseline or {}).get(key)
        self.rows.append(row)
        speedup_note = f" -> {row['speedup']:.2f}x" if row["speedup"] else ""
        print(f"  {name}: {optimized_label} {format_value(optimized.get(key))} vs {baseline_label} "
              f"{format_value((baseline or {}).get(key))} {metric}" + speedup_note,
              flush=True)
        return row

    def table(self) -> str:
        lines = ["| row | metric | optimized | baseline | speedup | outputs identical | peak memory MB (opt / base) |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            same = "-" if r["identical"] is None else ("yes" if r["identical"] else f"no ({r['agreement']:.1%})")
            speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}×"
            peaks = [(part or {}).get("peak_mb") for part in (r["optimized"], r["baseline"])]
            peak = " / ".join(format_value(p) for p in peaks) if peaks[0] is not None else "-"
            lines.append(f"| {r['name']} | {r['metric']} | "
                         f"{r['optimized_label']}: {format_value(r['optimized_value'])} | "
                         f"{r['baseline_label']}: {format_value(r['baseline_value'])} | {speed} | {same} | {peak} |")
        return "\n".join(lines)


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, tflops in PEAK_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return tflops
    return None
