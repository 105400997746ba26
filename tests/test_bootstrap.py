"""Image-level bootstrap: seeded, intervals around the estimate, an image's rows move together."""

import numpy as np
import pytest

from minigpt4.eval.bootstrap import (
    bootstrap_ci,
    bootstrap_summary,
    group_rows_by_unit,
    half_width_from_summary,
    resample_totals,
    safe_divide,
)


def ratio_statistic(totals: np.ndarray) -> dict:
    """Column 0 total / column 1 total."""
    return {"ratio": safe_divide(totals[..., 0], totals[..., 1])}


def random_rows(n_images: int = 60, rows_per_image: int = 3, seed: int = 1):
    rng = np.random.default_rng(seed)
    hits = rng.integers(0, 2, size=n_images * rows_per_image)
    rows = np.stack([hits, np.ones_like(hits)], axis=1)
    units = [f"img{i // rows_per_image}" for i in range(len(hits))]
    return rows, units


def test_same_seed_same_interval_other_seed_other_interval():
    rows, units = random_rows()
    first = bootstrap_ci(rows, units, ratio_statistic, n_resamples=300, seed=7)
    again = bootstrap_ci(rows, units, ratio_statistic, n_resamples=300, seed=7)
    other = bootstrap_ci(rows, units, ratio_statistic, n_resamples=300, seed=8)
    assert first == again
    assert first != other


def test_interval_contains_point_estimate_and_has_spread():
    rows, units = random_rows()
    point = rows[:, 0].sum() / rows[:, 1].sum()
    interval = bootstrap_ci(rows, units, ratio_statistic, n_resamples=500, seed=0)["ratio"]
    assert interval.low < point < interval.high
    assert interval.std > 0
    assert interval.half_width == pytest.approx((interval.high - interval.low) / 2)


def test_rows_of_an_image_are_resampled_together():
    # Every image has one row counting 1 of 1 and one counting 0 of 1: each image's own ratio is
    # exactly 1/2, so any resample of whole images has ratio exactly 1/2. Resampling single rows
    # would mix the two kinds of row and give a spread.
    n_images = 40
    rows = np.array([[1, 1], [0, 1]] * n_images, dtype=float)
    units = [i // 2 for i in range(2 * n_images)]
    interval = bootstrap_ci(rows, units, ratio_statistic, n_resamples=200, seed=0)["ratio"]
    assert interval.low == interval.high == 0.5
    assert interval.std == 0.0
    # The same rows with every row its own unit do spread.
    spread = bootstrap_ci(rows, list(range(len(rows))), ratio_statistic, 200, 0)["ratio"]
    assert spread.std > 0.01


def test_each_resample_draws_as_many_images_as_there_are():
    # Image a has 1 row, image b has 3: one resample's row count is 1 * (times a drawn)
    # + 3 * (times b drawn), with the two draw counts summing to 2, so it is 2, 4 or 6.
    rows = np.ones((4, 1))
    totals = resample_totals(rows, ["a", "b", "b", "b"], n_resamples=500, seed=0)
    assert totals.shape == (500, 1)
    assert set(np.unique(totals[:, 0])) == {2.0, 4.0, 6.0}


def test_group_rows_by_unit_sums_in_first_appearance_order():
    rows = np.array([[1, 2], [3, 4], [5, 6]], dtype=float)
    grouped = group_rows_by_unit(rows, ["y", "x", "y"])
    np.testing.assert_array_equal(grouped, [[6, 8], [3, 4]])


def test_safe_divide_defines_zero_over_zero_as_zero():
    np.testing.assert_array_equal(safe_divide([1, 0, 3], [2, 0, 0]), [0.5, 0.0, 0.0])


def test_summary_block_and_half_width():
    rows, units = random_rows()
    intervals = bootstrap_ci(rows, units, ratio_statistic, n_resamples=100, seed=0)
    summary = bootstrap_summary(intervals, 100, 0)
    assert summary["unit"] == "image" and summary["n_resamples"] == 100
    low, high = summary["ci"]["ratio"]
    assert half_width_from_summary(summary, "ratio") == pytest.approx((high - low) / 2)
    assert half_width_from_summary(summary, "absent") is None
    assert half_width_from_summary(None, "ratio") is None


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="units has 2 entries"):
        resample_totals(np.ones((3, 1)), ["a", "b"])
    with pytest.raises(ValueError, match="n_resamples"):
        resample_totals(np.ones((1, 1)), ["a"], n_resamples=0)


def test_too_many_resamples_are_refused_before_any_allocation():
    """10^11 resamples of 6 images would be a 4 TiB draw: a ValueError naming the most that fit, not a MemoryError."""
    with pytest.raises(ValueError, match=r"100000000000 resamples of 6 images need .* GiB .* use at most 44739242 "):
        resample_totals(np.ones((6, 2)), list("abcdef"), n_resamples=10 ** 11)
    assert resample_totals(np.ones((6, 2)), list("abcdef"), n_resamples=44739242 // 1000).shape == (44739, 2)
