"""Image-level bootstrap confidence intervals for the benchmark scorers.

Both scorers report metrics that are functions of *totals* over rows: POPE's accuracy is
Σ correct / Σ rows, its precision TP / (TP + FP); CHAIR_S is Σ hallucinated captions /
Σ captions, CHAIR_I Σ hallucinated mentions / Σ mentions, and so on. The unit of sampling is the
image: rows of the same image (three POPE questions about one picture, several captions of one
image) are not independent, so a resample draws images with replacement and every row of a drawn
image comes along, as many times as the image was drawn.

Because the statistics only need column totals, one resample's totals are
Σ_image (times drawn) × (that image's row totals): a matrix product of a [resamples × images]
draw-count matrix with an [images × columns] table. That makes 1,000 resamples of a few thousand
rows a single small matmul instead of a Python loop.

The interval is the percentile interval (2.5th and 97.5th percentiles for level 0.95) of the
resampled statistic; the standard deviation of the resampled statistic is returned as well.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# The largest draw a resample may make: its [resamples x units] int64 draw counts and their float64 copy, 16 bytes
# a cell. A fixed bound (the same one evaluate.py checks eval.bootstrap against before generating), not the free
# memory of the moment: 1000 resamples of all 40,504 COCO val images take 0.6 GiB.
MAX_DRAW_BYTES = 4 * 1024 ** 3
DRAW_BYTES_PER_CELL = 16

# A statistic maps column totals, shape [n_resamples, n_columns] (or [n_columns] for the point
# estimate), to named metric values of shape [n_resamples] (or scalars).
TotalsStatistic = Callable[[np.ndarray], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Interval:
    """Percentile bootstrap interval of one metric and the spread of its resampled values."""

    low: float
    high: float
    std: float

    @property
    def half_width(self) -> float:
        """Half the interval width: the '±' shown next to a point estimate in tables."""
        return (self.high - self.low) / 2.0

    def as_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high, "std": self.std}


def safe_divide(numerator: np.ndarray | float, denominator: np.ndarray | float) -> np.ndarray:
    """Element-wise numerator / denominator with 0.0 wherever the denominator is 0.

    The scorers define an undefined ratio (no "yes" predictions for precision, no mentions for
    CHAIR_I, ...) as 0.0, both for the point estimate and inside every resample, so that an
    interval never contains NaN.
    """
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    zero = denominator == 0
    return np.where(zero, 0.0, numerator / np.where(zero, 1.0, denominator))


def group_rows_by_unit(row_values: np.ndarray, units: Sequence[Hashable]) -> np.ndarray:
    """Sum the rows of each unit: [n_rows, n_columns] -> [n_units, n_columns].

    Units are ordered by first appearance, which keeps the result (and so the resamples drawn
    from it) independent of hash seeds.
    """
    row_values = np.asarray(row_values, dtype=np.float64)
    if row_values.ndim != 2:
        raise ValueError(f"row_values must be 2-D [rows, columns], got shape {row_values.shape}")
    if len(units) != row_values.shape[0]:
        raise ValueError(
            f"units has {len(units)} entries but row_values has {row_values.shape[0]} rows"
        )
    unit_index: dict[Hashable, int] = {}
    row_to_unit = np.fromiter(
        (unit_index.setdefault(unit, len(unit_index)) for unit in units),
        dtype=np.int64,
        count=len(units),
    )
    per_unit = np.zeros((len(unit_index), row_values.shape[1]), dtype=np.float64)
    np.add.at(per_unit, row_to_unit, row_values)
    return per_unit


def resample_totals(
    row_values: np.ndarray,
    units: Sequence[Hashable],
    n_resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Column totals of `n_resamples` image-level resamples, shape [n_resamples, n_columns].

    Each resample draws as many units as there are, with replacement; drawing a unit k times
    adds k times its rows. Deterministic for a given seed.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    per_unit = group_rows_by_unit(row_values, units)
    n_units = per_unit.shape[0]
    if n_units == 0:
        raise ValueError("cannot bootstrap an empty set of rows")
    needed = DRAW_BYTES_PER_CELL * n_resamples * n_units
    if needed > MAX_DRAW_BYTES:  # numpy would fail with a MemoryError traceback, or swap for hours
        most = MAX_DRAW_BYTES // (DRAW_BYTES_PER_CELL * n_units)
        raise ValueError(f"{n_resamples} resamples of {n_units} images need {needed / 1024 ** 3:.1f} GiB for the draws "
                         f"(at most {MAX_DRAW_BYTES // 1024 ** 3} GiB); use at most {most} resamples (1000 is usual)")
    rng = np.random.default_rng(seed)
    # How many times each unit is drawn in each resample: a multinomial with n_units draws.
    draw_counts = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_resamples)
    return draw_counts.astype(np.float64) @ per_unit


def bootstrap_ci(
    row_values: np.ndarray,
    units: Sequence[Hashable],
    statistic: TotalsStatistic,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Interval]:
    """Percentile bootstrap intervals, resampling units (images) with replacement.

    row_values: [n_rows, n_columns] per-row quantities (counts such as "is a true positive").
    units: the image id of each row; all rows of an image are resampled together.
    statistic: maps column totals [..., n_columns] to {metric name: values [...]}.
    Returns {metric name: Interval}.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    totals = resample_totals(row_values, units, n_resamples=n_resamples, seed=seed)
    tail = (1.0 - level) / 2.0 * 100.0
    intervals: dict[str, Interval] = {}
    for name, values in statistic(totals).items():
        values = np.asarray(values, dtype=np.float64)
        low, high = np.percentile(values, [tail, 100.0 - tail])
        spread = float(values.std(ddof=1)) if values.size > 1 else 0.0
        intervals[name] = Interval(low=float(low), high=float(high), std=spread)
    return intervals


def bootstrap_summary(
    intervals: Mapping[str, Interval], n_resamples: int, seed: int, level: float = 0.95
) -> dict:
    """The JSON block both scorers store under "bootstrap" (format documented in their modules)."""
    return {
        "unit": "image",
        "method": "percentile",
        "n_resamples": n_resamples,
        "seed": seed,
        "level": level,
        "ci": {name: [interval.low, interval.high] for name, interval in intervals.items()},
        "std": {name: interval.std for name, interval in intervals.items()},
    }


def half_width_from_summary(summary: Mapping | None, metric: str) -> float | None:
    """The '±' for `metric` from a stored "bootstrap" block, or None when there is none."""
    if not summary or metric not in summary.get("ci", {}):
        return None
    low, high = summary["ci"][metric]
    return (high - low) / 2.0
