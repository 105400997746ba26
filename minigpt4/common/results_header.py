"""The first line of a generated results file (the experiment's results.md, the benchmarks' OUT.md, and their
copies under docs/results/): when it was made, on what machine, and from which commit.

    results_header(load_before)
    # "Generated 2026-12-07 05:12 UTC on Intel(R) Xeon(R) ... (2 cores, 1 torch thread; load average 2.10 2.61 3.29
    #  before, 2.40 2.50 3.20 after), commit ac40680 with uncommitted changes to 3 tracked files."

A measured number means little without these: a timing depends on the machine and its load, and every number
on the code that made it (provenance.py records the same commit and dirty flag for training and evaluation runs).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path
from typing import Sequence

from minigpt4.common.jsonfiles import write_text_atomic
from minigpt4.common.provenance import git_state


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux); elsewhere what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded to hundredths."""
    return [round(x, 2) for x in os.getloadavg()]


def _load(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _commit() -> str:
    state = git_state()
    if state["commit"] is None:
        return f"commit unknown ({state['reason']})"
    text = f"commit {state['commit'][:12]}"
    if state["dirty"]:
        files = state["changed_files"]
        text += f" with uncommitted changes to {files} tracked file{'s' if files != 1 else ''}"
    return text


def results_header(load_before: Sequence[float], *, gpu: str | None = None,
                   now: datetime.datetime | None = None) -> str:
    """One line: the date (UTC), the machine (CPU model or `gpu`, cores, torch threads, the load average when the
    run began and now), and the git commit with a dirty flag. Call it when the file is written."""
    import torch

    now = now or datetime.datetime.now(datetime.timezone.utc)
    threads = torch.get_num_threads()
    machine = (f"{gpu or cpu_model()} ({os.cpu_count()} cores, {threads} torch thread{'s' if threads != 1 else ''}; "
               f"load average {_load(load_before)} before, {_load(load_average())} after)")
    return f"Generated {now:%Y-%m-%d %H:%M} UTC on {machine}, {_commit()}."


def check_publish_path(destination: str | os.PathLike) -> Path:
    """The destination as a Path; ValueError unless it names a Markdown file."""
    destination = Path(destination)
    if destination.suffix != ".md" or destination.is_dir():
        raise ValueError(f"{destination}: expected a Markdown file name ending in .md, e.g. docs/results/NAME.md")
    return destination


def publish_path(text: str) -> Path:
    """argparse type of the scripts' --publish: checked when the arguments are read, so that a long run does not
    end in the error."""
    try:
        return check_publish_path(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def publish(markdown: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Copy a written Markdown file to `destination` (e.g. docs/results/NAME.md), atomically: a crash leaves the
    old copy or the new one, never half of one."""
    destination = check_publish_path(destination)
    write_text_atomic(destination, Path(markdown).read_text(encoding="utf-8"))
    return destination
