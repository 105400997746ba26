"""minigpt4/eval/entropy_correlation.py against cases worked out by hand, and its bootstrap against the
same statistics on explicitly expanded resamples."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from minigpt4.eval.bootstrap import resample_totals
from minigpt4.eval.entropy_correlation import (
    caption_rows,
    correlation_statistics,
    entropy_hallucination_correlation,
    eval_dir_correlation,
    hallucination_by_bin,
    overall_finding,
    plot_hallucination_by_bin,
    verdict,
    weighted_ranks,
)


def test_four_captions_by_hand():
    # H/log V 0.1 0.2 0.3 0.4 with flags 1 0 1 0. Ranks of H: 1 2 3 4; of the flag (two ties each): 3.5 1.5 3.5
    # 1.5. Spearman: deviations (-1.5 -.5 .5 1.5) and (1 -1 1 -1): Σ products -2, Σ squares 5 and 4: -2/√20.
    # Point-biserial: deviations (-.15 -.05 .05 .15) and (.5 -.5 .5 -.5): -.1 / √(.05 · 1) = -2/√20 as well.
    # AUC: hallucinating {.1, .3} vs clean {.2, .4}: only .3 > .2 of the four pairs: 1/4.
    stats = correlation_statistics(np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 0, 1, 0]), np.ones(4))
    assert stats["spearman"] == pytest.approx(-2 / math.sqrt(20))
    assert stats["point_biserial"] == pytest.approx(-2 / math.sqrt(20))
    assert stats["auc"] == pytest.approx(0.25)


def test_weights_count_rows_as_repeats_and_ties_count_half():
    # Weights 2 1 1 1 are the sample .1 .1 .2 .3 .4 with flags 1 1 0 1 0: ranks 1.5 1.5 3 4 5. AUC: hallucinating
    # {.1, .1, .3} vs clean {.2, .4}: .3 > .2 is the only one of 6 pairs above: 1/6.
    ratio, flag = np.array([0.1, 0.2, 0.3, 0.4]), np.array([1, 0, 1, 0])
    assert weighted_ranks(ratio, np.array([2.0, 1, 1, 1])) == pytest.approx([1.5, 3, 4, 5])
    weighted = correlation_statistics(ratio, flag, np.array([2.0, 1, 1, 1]))
    assert weighted["auc"] == pytest.approx(1 / 6)
    # Spearman of the expanded sample by hand: ranks (1.5 1.5 3 4 5), flag ranks (4 4 1.5 4 1.5).
    # Both means are 3: deviations (-1.5 -1.5 0 1 2) and (1 1 -1.5 1 -1.5), Σ products -5, Σ squares 9.5 and 7.5.
    assert weighted["spearman"] == pytest.approx(-5 / math.sqrt(9.5 * 7.5))
    # A hallucinating and a clean caption with the same H/log V: the pair counts one half.
    assert correlation_statistics(np.array([0.5, 0.5]), np.array([1, 0]), np.ones(2))["auc"] == pytest.approx(0.5)
    # No clean caption: every statistic is undefined (NaN), not a number.
    undefined = correlation_statistics(ratio, np.ones(4), np.ones(4))
    assert all(math.isnan(float(v)) for v in undefined.values())


def test_bootstrap_interval_is_that_of_the_expanded_resamples():
    rng = np.random.default_rng(3)
    ratio = rng.uniform(0.9, 1.0, 40)
    flag = rng.uniform(size=40) < 0.2 + 4 * (1.0 - ratio)  # lower H/log V: hallucinates more often
    images = [f"img{i}" for i in range(40)]
    result = entropy_hallucination_correlation(ratio, flag, images, n_resamples=200, seed=5)
    # The same draws, expanded into explicit samples and scored one by one.
    counts = resample_totals(np.eye(40), images, n_resamples=200, seed=5).astype(int)
    for name in ("spearman", "auc"):
        values = []
        for draw in counts:
            index = np.repeat(np.arange(40), draw)
            values.append(float(correlation_statistics(ratio[index], flag[index], np.ones(index.size))[name]))
        values = np.array(values)
        defined = values[~np.isnan(values)]
        assert result[name]["undefined_resamples"] == 200 - defined.size
        assert result[name]["ci"] == pytest.approx(list(np.percentile(defined, [2.5, 97.5])))
        low, high = result[name]["ci"]
        assert low <= result[name]["value"] <= high
    assert result["n_hallucinated"] == int(flag.sum()) and result["n_images"] == 40
    assert result["spearman"]["value"] < 0 and verdict(result).startswith("ρ = -")


def test_rows_of_one_image_are_resampled_together():
    # Two captions per image: the draws are of images, so each resample weights both rows of an image alike.
    ratio = np.array([0.2, 0.2, 0.6, 0.6, 0.9, 0.9])
    images = ["a", "a", "b", "b", "c", "c"]
    drawn = resample_totals(np.eye(6), images, n_resamples=50, seed=1)
    assert np.array_equal(drawn[:, 0], drawn[:, 1]) and np.array_equal(drawn[:, 4], drawn[:, 5])
    result = entropy_hallucination_correlation(ratio, [1, 0, 1, 0, 0, 0], images, n_resamples=50)
    assert result["n_images"] == 3 and result["n_captions"] == 6


def test_undefined_and_bad_inputs():
    everything = entropy_hallucination_correlation([0.5, 0.6, 0.7], [True, True, True], [1, 2, 3], n_resamples=20)
    assert everything["spearman"] == {"value": None, "ci": None, "undefined_resamples": 20}
    assert verdict(everything).startswith("undefined: 3 of 3 captions hallucinate")
    with pytest.raises(ValueError, match="finite"):
        entropy_hallucination_correlation([0.5, float("nan")], [True, False], [1, 2])
    with pytest.raises(ValueError, match="one H/log V, flag and image per caption"):
        entropy_hallucination_correlation([0.5, 0.6], [True], [1, 2])


def test_bins_hold_equal_counts_in_increasing_order():
    bins = hallucination_by_bin([0.9, 0.1, 0.5, 0.3, 0.7], [1, 1, 0, 0, 1], n_bins=2)
    assert [(b["n"], b["hallucinated"]) for b in bins] == [(3, 1), (2, 2)]  # {.1 .3 .5}, {.7 .9}
    assert bins[0]["low"] == 0.1 and bins[0]["high"] == 0.5 and bins[1]["rate"] == 1.0
    assert bins[0]["mean_entropy_ratio"] == pytest.approx(0.3)
    assert len(hallucination_by_bin([0.4, 0.5], [0, 1], n_bins=5)) == 2


def test_caption_rows_join_chair_rows_to_the_entropy_of_their_image():
    chair = {"per_caption": [{"image_id": 7, "hallucinated": ["star"]}, {"image_id": 9, "hallucinated": []}]}
    assert caption_rows(chair, {"7": 0.91, "9": 0.95}) == ([0.91, 0.95], [True, False], ["7", "9"])
    with pytest.raises(ValueError, match="image 9 has no H/log V"):
        caption_rows(chair, {"7": 0.91}, source="x/chair.json")
    with pytest.raises(ValueError, match="no per_caption rows"):
        caption_rows({}, {})


def test_an_eval_folder_is_joined_to_its_model_and_reported(tmp_path):
    # Four captions (ids 1-4) with the four-caption case above: ρ = -2/√20 at the point.
    rows = [{"image_id": i, "hallucinated": ["star"] if i % 2 else []} for i in (1, 2, 3, 4)]
    (tmp_path / "chair.json").write_text(json.dumps({"per_caption": rows}))
    entropy = {"images": ["1", "2", "3", "4"], "vocab_size": 473,
               "models": {"a": {"entropy_ratio": [0.1, 0.2, 0.3, 0.4]}, "b": {"entropy_ratio": [0.4, 0.3, 0.2, 0.1]}}}
    result, ratio, flags = eval_dir_correlation(tmp_path, entropy, "a")
    assert result["spearman"]["value"] == pytest.approx(-2 / math.sqrt(20)) and result["model"] == "a"
    assert ratio == [0.1, 0.2, 0.3, 0.4] and flags == [True, False, True, False]
    assert eval_dir_correlation(tmp_path, entropy, "b")[0]["spearman"]["value"] == pytest.approx(2 / math.sqrt(20))
    assert [b["n"] for b in result["bins"]] == [1, 1, 1, 1]
    finding = overall_finding([result])
    assert finding.startswith("Of 1 measurements") and "0.1–0.4 over every image" in finding
    plot_hallucination_by_bin({"world": {"a": result["bins"]}}, tmp_path / "plot.png", "title")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_visual_entropy_script_refuses_bad_model_arguments(capsys):
    from _scripts import load_script

    script = load_script("visual_entropy")
    base = ["--cfg-path", "eval_configs/shapes_base.yaml", "--out", "x.json"]
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(base + ["--model", "a", "--model", "a", "model.ckpt=y"])
    assert exit_info.value.code == 2 and "each name once, got ['a', 'a']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(base + ["--model", "a", "eval.batch_size=2"])
    assert "--model a: overrides must be model.KEY=VALUE, got ['eval.batch_size=2']" in capsys.readouterr().err
