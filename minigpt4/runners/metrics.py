"""Training metrics: one JSON line per logged optimizer step (rank 0), optional TensorBoard / W&B mirrors.

Every line holds the step, epoch, lr, the model's scalars (already averaged over the accumulation micro-batches
and the ranks), grad_norm and the skipped-step counter, all of which are deterministic, plus the timing fields in
TIMING_FIELDS, which are not. On resume the file is cut back to the checkpoint's step, so a killed and resumed
run leaves the same log (timing fields aside) as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TIMING_FIELDS = ("samples_per_s", "tokens_per_s", "elapsed_s")


def _json_value(value: Any) -> Any:
    # JSON has no NaN/inf; a non-finite value is written as null (the skipped_nonfinite counter says why).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line, from a kill mid-write, is ignored)."""
    p = Path(path)
    if not p.is_file():
        return []
    records = []
    lines = p.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{p}:{number} is not valid JSON: {line[:80]!r}") from None
    return records


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Keep only the records with step <= last_step (rewritten atomically)."""
    p = Path(path)
    kept = [r for r in read_metrics(p) if r.get("step", 0) <= last_step]
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, p)


class MetricsWriter:
    """Writes records to metrics.jsonl and, if asked, to TensorBoard and Weights & Biases (imported lazily)."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        resume_step: int,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "minigpt4-adavib",
        wandb_run_name: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("run.tensorboard is true but the `tensorboard` package is missing: "
                                  "pip install tensorboard (or set run.tensorboard: false)") from err
            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=resume_step + 1)
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError as err:
                raise ImportError("run.wandb is true but the `wandb` package is missing: "
                                  "pip install wandb (or set run.wandb: false)") from err
            self._wandb = wandb_module.init(
                project=wandb_project, name=wandb_run_name, config=config, dir=str(output_dir), resume="allow"
            )

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        step = record["step"]
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
