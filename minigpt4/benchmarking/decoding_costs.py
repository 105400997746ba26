"""What a decode-time mitigation costs (scripts/benchmark.py rows "VCD: …" and "OPERA: …"): the method against
plain decodings of the same model on the same questions, in the same run and interleaved (measure.interleaved, so
every variant sees the same drift of a shared machine's load), batched and at batch size 1; and the method's
batched answers against its batch-1 answers (identical on the CPU). A row's "speedup" is baseline / method: what
the method costs, as a factor."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from minigpt4.benchmarking.measure import Report, interleaved
from minigpt4.benchmarking.workloads import time_generation

# timer(name, items, batch_size, decoding, generate_kwargs) -> (answers by key, stats with items_per_s)
Timer = Callable[[str, list, int, Any, dict], tuple[dict, dict]]


def generation_timer(model, workdir: Path, **fixed) -> Timer:
    """workloads.time_generation as a Timer: `model`, scratch folder `workdir`, the `fixed` settings."""
    def timer(name: str, items: list, batch_size: int, decoding: Any, generate_kwargs: dict):
        return time_generation(model, items, workdir, name, batch_size=batch_size, decoding=decoding,
                               generate_kwargs=generate_kwargs, **fixed)
    return timer


def decoding_cost_rows(report: Report, timer: Timer, *, name: str, label: str, decoding: Any, kwargs: dict,
                       baselines: dict[str, dict], items: list, subset: list, batch: int, repeats: int,
                       metric: str) -> dict:
    """Time `decoding` (generate kwargs `kwargs`) and each baseline ({label: generate kwargs}) on `items` at batch
    `batch` and on `subset` at batch 1; add the rows to `report` (rates in `metric`); return the costs (against the
    first baseline also under throughput_cost_x and latency_cost_x)."""
    slug = name.lower()

    def variant(run: str, these: list, size: int, method: Any, generate_kwargs: dict):
        return lambda: timer(f"{slug}_{run}", these, size, method, generate_kwargs)

    runs = {slug: variant("batched", items, batch, decoding, kwargs), f"{slug}_b1": variant("b1", subset, 1,
                                                                                           decoding, kwargs)}
    for index, plain in enumerate(baselines.values()):
        runs[f"base{index}"] = variant(f"base{index}", items, batch, None, plain)
        runs[f"base{index}_b1"] = variant(f"base{index}_b1", subset, 1, None, plain)
    timed = interleaved(runs, repeats, "items_per_s")
    for answers, stats in timed.values():
        stats["mean_answer_words"] = sum(len(a.split()) for a in answers.values()) / max(len(answers), 1)
    seconds = {key: 1 / stats["items_per_s"] for key, (_, stats) in timed.items()}
    costs = {}
    for index, baseline in enumerate(baselines):
        base, method = timed[f"base{index}"][1], timed[slug][1]
        report.add(f"{name}: throughput vs {baseline}", metric, base, method, "items_per_s",
                   optimized_label=f"{baseline}, batch {batch}", baseline_label=f"{label}, batch {batch}",
                   note=f"speedup = {baseline} / {name}: {name}'s cost factor")
        report.add(f"{name}: latency vs {baseline} (batch 1)", metric, timed[f"base{index}_b1"][1],
                   timed[f"{slug}_b1"][1], "items_per_s", optimized_label=baseline, baseline_label=label,
                   note=f"speedup = {baseline} / {name}: {name}'s cost factor per item")
        costs[baseline] = {"throughput_cost_x": base["items_per_s"] / method["items_per_s"],
                           "latency_cost_x": seconds[f"{slug}_b1"] / seconds[f"base{index}_b1"]}
    report.add(f"{name}: batching", metric, timed[slug][1], timed[f"{slug}_b1"][1], "items_per_s",
               optimized_label=f"batch {batch}", baseline_label="batch 1",
               answers=(timed[slug][0], timed[f"{slug}_b1"][0]))
    first = costs[next(iter(baselines))]
    return {"decoding": label, "items": len(items), "batch": batch, **first, "cost_x_by_baseline": costs,
            "latency_s_per_item": {key: value for key, value in seconds.items() if key.endswith("_b1")},
            "mean_answer_words": {key: stats["mean_answer_words"] for key, (_, stats) in timed.items()}}
