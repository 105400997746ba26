"""Running the experiment's plan (plan.py): each step as a subprocess in the repository root, its full output in
<step folder>.<kind>.log, its latest progress line (a tqdm bar) live beside it, and where the whole run stands
after each step: step k of N, the elapsed time and an estimate of what is left.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from minigpt4.common.jsonfiles import read_json, write_json
from minigpt4.common.provenance import PROVENANCE_FILE
from minigpt4.shapes.experiment.plan import STAMP_FILE, Step

ROOT = Path(__file__).resolve().parents[3]  # the checkout: train.py, evaluate.py, scripts/ run from here
# Without a terminal (a log file, CI) the child's progress line is printed at most this often, in seconds.
PLAIN_EVERY_S = 20.0


def clock(seconds: float) -> str:
    """M:SS, or H:MM:SS from an hour on."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes >= 60:
        return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
    return f"{minutes}:{seconds:02d}"


class Progress:
    """Where the whole run stands: step k of N, the time since the start, and an estimate of what is left (the
    steps still to run, each taking the mean time of the steps of its kind run so far)."""

    def __init__(self, steps: list[Step], stream=None):
        self.steps, self.stream = steps, stream or sys.stdout
        self.start = time.perf_counter()
        self.durations: dict[str, list[float]] = {}
        self.to_run = [not step.reusable() for step in steps]

    def say(self, index: int, text: str) -> None:
        print(f"  [{index + 1}/{len(self.steps)}] {text}", file=self.stream, flush=True)

    def left(self, index: int) -> str:
        """The estimate after step `index` ran: "about M:SS left (n steps)" (a kind not run yet counts at the mean
        of all steps so far), or "nothing left"."""
        every = [d for ds in self.durations.values() for d in ds]  # never empty: called after a step ran
        later = zip(self.steps[index + 1:], self.to_run[index + 1:])
        remaining = [step.kind for step, run in later if run]
        if not remaining:
            return "nothing left"
        mean = {kind: sum(ds) / len(ds) for kind, ds in self.durations.items()}
        estimate = sum(mean.get(kind, sum(every) / len(every)) for kind in remaining)
        return f"about {clock(estimate)} left ({len(remaining)} step{'s' if len(remaining) > 1 else ''})"

    def done(self, index: int, seconds: float) -> None:
        step = self.steps[index]
        self.durations.setdefault(step.kind, []).append(seconds)
        elapsed = clock(time.perf_counter() - self.start)
        self.say(index, f"done   {step.kind} in {seconds:.0f} s · elapsed {elapsed} · {self.left(index)}")


class LiveLine:
    """The child's latest output line (a tqdm bar or a log line) beside the step. On a terminal it is redrawn
    in place; otherwise (a log file, CI) it is printed as a line at most every PLAIN_EVERY_S seconds."""

    def __init__(self, prefix: str, stream=None):
        self.prefix, self.stream = prefix, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.last_shown, self.shown = 0.0, ""

    def show(self, text: str) -> None:
        text = text.strip()
        now = time.perf_counter()
        every = 0.2 if self.tty else PLAIN_EVERY_S
        if not text or text == self.shown or now - self.last_shown < every:
            return
        self.last_shown, self.shown = now, text
        if self.tty:
            width = shutil.get_terminal_size().columns - len(self.prefix) - 1
            self.stream.write("\r\x1b[K" + self.prefix + text[:max(width, 10)])
            self.stream.flush()
        else:
            print(self.prefix + text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def stream_child(command: list[str], log_path: Path, line: LiveLine) -> int:
    """Run `command`, every byte of its output into `log_path`, its latest line to `line` as it comes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the child's prints arrive when made, not at exit
    with open(log_path, "wb") as log, subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc:
        pending = b""
        while chunk := proc.stdout.read1(65536):
            log.write(chunk)
            log.flush()
            *complete, pending = re.split(rb"[\r\n]", pending + chunk)  # tqdm redraws with \r
            latest = next((c for c in reversed([*complete, pending]) if c.strip()), b"")
            line.show(latest.decode("utf-8", errors="replace"))
        line.close()
        return proc.wait()


def run_step(step: Step, index: int, progress: Progress) -> None:
    """Run `step` unless it is reusable; its full output goes to its log file, its progress line to the screen."""
    if step.reusable():
        progress.say(index, f"reuse  {step.out_dir}")
        return
    stamp = step.stamp()  # a placeholder (MatchedBeta) reads its run, which ran earlier in the plan
    command = stamp["command"]
    if step.out_dir.exists():
        shutil.rmtree(step.out_dir)
    step.out_dir.mkdir(parents=True)
    write_json(step.out_dir / STAMP_FILE, stamp, indent=1)
    progress.say(index, "run    " + shlex.join(command))
    progress.say(index, f"log    {step.log_path}")
    started = time.perf_counter()
    live = LiveLine(f"  [{index + 1}/{len(progress.steps)}]   │ ")
    returncode = stream_child(command, step.log_path, live)
    if returncode != 0 or not (step.out_dir / step.done_file).is_file():
        tail = step.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise RuntimeError(f"step failed (exit {returncode}); last lines of {step.log_path}:\n" + "\n".join(tail))
    progress.done(index, time.perf_counter() - started)


def step_commits(steps: list[Step]) -> str:
    """Which commits produced the steps, from the provenance.json that train.py and evaluate.py write: one
    sentence for the report. A resumed run can mix steps made by older code (reuse checks the command line and
    its files, not the code), and a table must not look as if one commit made all of it."""
    counts: dict[str, int] = {}
    for step in steps:
        path = step.out_dir / PROVENANCE_FILE
        if not path.is_file():
            continue  # visual_entropy.py writes none: its numbers come from the models the other steps made
        git = read_json(path).get("git") or {}
        name = (git.get("commit") or "unknown")[:12] + (" with uncommitted changes" if git.get("dirty") else "")
        counts[name] = counts.get(name, 0) + 1
    if not counts:
        return "No step recorded its commit."
    if len(counts) == 1:
        return f"Every step was produced by commit {next(iter(counts))}."
    by_count = sorted(counts.items(), key=lambda kv: -kv[1])
    listed = "; ".join(f"{name} ({n} step{'s' if n != 1 else ''})" for name, n in by_count)
    return f"The steps were produced by {len(counts)} commits: {listed}."


def run_plan(steps: list[Step]) -> None:
    progress = Progress(steps)
    to_run = sum(progress.to_run)
    print(f"plan: {len(steps)} steps ({to_run} to run, {len(steps) - to_run} finished before and reused); "
          "full logs next to each step's output folder", flush=True)
    for index, step in enumerate(steps):
        if index == 0 or step.label != steps[index - 1].label:
            print(step.label, flush=True)
        run_step(step, index, progress)
    print(f"all {len(steps)} steps done in {clock(time.perf_counter() - progress.start)}", flush=True)


def print_plan(steps: list[Step]) -> None:
    """--dry-run: every step's command line, and whether it would run or be reused."""
    for index, step in enumerate(steps):
        state = "reuse" if step.reusable() else "run  "
        command = step.resolved() if step.ready() else [str(part) for part in step.command]
        print(f"  [{index + 1}/{len(steps)}] {state} {step.kind:<7} {step.label} | {shlex.join(command)}")
