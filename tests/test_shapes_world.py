"""Shapes world: determinism, COCO/POPE/CHAIR file formats, caption completeness, co-occurrence bias."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from minigpt4.shapes.world.scenes import (
    CAPTION_TEMPLATES,
    CLASS_BY_NAME,
    CLASS_NAMES,
    COLOURS,
    COOCCURRENCE_PAIRS,
    NUMBER_WORDS,
    SHAPE_CLASSES,
    SIZES,
    ShapeObject,
    build_shapes_world,
    make_caption,
    render_image,
    sample_scene,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_train=400, num_val=80, image_size=64, captions_per_image=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    return build_shapes_world(tmp_path_factory.mktemp("shapes_world"), seed=3, **SMALL)


def _load(path: str) -> object:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _present_classes(world: dict[str, str]) -> dict[int, set[str]]:
    present: dict[int, set[str]] = defaultdict(set)
    for split in ("train", "val"):
        data = _load(world[f"instances_{split}"])
        names = {c["id"]: c["name"] for c in data["categories"]}
        for image in data["images"]:
            present.setdefault(image["id"], set())
        for annotation in data["annotations"]:
            present[annotation["image_id"]].add(names[annotation["category_id"]])
    return dict(present)


def _all_files(root: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Names


def test_names_round_trip_through_the_chair_singularizer():
    from minigpt4.eval.chair import singularize

    vocabulary = [c.name for c in SHAPE_CLASSES] + [s for c in SHAPE_CLASSES for s in c.synonyms]
    assert len(vocabulary) == len(set(vocabulary)), "a word may name one class only"
    for shape in SHAPE_CLASSES:
        assert singularize(shape.name) == shape.name
        assert singularize(shape.plural) == shape.name, shape.plural
        for synonym in shape.synonyms:
            assert singularize(synonym) == synonym
    # No other word the captions or questions use may be read as an object.
    template_words = re.findall(r"[a-z]+", " ".join(CAPTION_TEMPLATES).lower())
    other_words = set(template_words) | set(COLOURS) | set(SIZES) | set(NUMBER_WORDS.values())
    other_words |= {"a", "an", "and", "next", "to", "beside", "is", "there", "in", "the", "image"}
    assert not {singularize(w) for w in other_words} & set(vocabulary)


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_arguments_give_identical_bytes_and_another_seed_differs(tmp_path):
    args = dict(num_train=25, num_val=10, image_size=48, captions_per_image=2)
    first = _all_files(build_shapes_world(tmp_path / "a", seed=7, **args)["root"])
    second = _all_files(build_shapes_world(tmp_path / "b", seed=7, **args)["root"])
    other = _all_files(build_shapes_world(tmp_path / "c", seed=8, **args)["root"])
    assert len(first) == 35 + 11  # 35 images + 4 annotation files, 3 POPE files, 4 others
    assert first == second
    assert first.keys() == other.keys()
    assert first["images/000000000001.jpg"] != other["images/000000000001.jpg"]
    assert first["train_captions.json"] != other["train_captions.json"]


def test_caption_depends_only_on_seed_image_and_template():
    objects = sample_scene(np.random.default_rng([0, 5, 0]), 64, 0.9)
    same = [make_caption(objects, 2, np.random.default_rng([1, 5, 102])) for _ in range(2)]
    assert same[0] == same[1]
    image_a = render_image(objects, 64, np.random.default_rng(0))
    image_b = render_image(objects, 64, np.random.default_rng(0))
    assert image_a.size == (64, 64) and image_a.mode == "RGB"
    assert image_a.tobytes() == image_b.tobytes()


def test_rebuild_needs_overwrite_and_leaves_no_stale_images(tmp_path):
    build_shapes_world(tmp_path, num_train=12, num_val=4)
    with pytest.raises(FileExistsError, match="overwrite"):
        build_shapes_world(tmp_path, num_train=5, num_val=2)
    build_shapes_world(tmp_path, num_train=5, num_val=2, overwrite=True)
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 7
    foreign = tmp_path / "other"
    (foreign / "keep.txt").parent.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="meta.json"):
        build_shapes_world(foreign, num_train=5, num_val=2, overwrite=True)


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="cooccurrence"):
        build_shapes_world(tmp_path, num_train=2, num_val=2, cooccurrence=1.5)
    with pytest.raises(ValueError, match="captions_per_image"):
        build_shapes_world(tmp_path, num_train=2, num_val=2, captions_per_image=len(CAPTION_TEMPLATES) + 1)


# ---------------------------------------------------------------------------------------------
# File formats


def test_coco_files_are_consistent(world):
    ids = {}
    for split in ("train", "val"):
        instances, captions = _load(world[f"instances_{split}"]), _load(world[f"captions_{split}"])
        image_ids = [image["id"] for image in instances["images"]]
        assert image_ids == [image["id"] for image in captions["images"]]
        assert len(set(image_ids)) == len(image_ids) == SMALL[f"num_{split}"]
        ids[split] = set(image_ids)
        category_ids = {c["id"] for c in instances["categories"]}
        assert [c["name"] for c in instances["categories"]] == list(CLASS_NAMES)
        annotation_ids = [a["id"] for a in instances["annotations"]]
        assert len(set(annotation_ids)) == len(annotation_ids)
        for image in instances["images"]:
            assert image["file_name"] == f"{image['id']:0>12}.jpg"
            assert (Path(world["images"]) / image["file_name"]).is_file()
        for a in instances["annotations"]:
            assert a["image_id"] in ids[split] and a["category_id"] in category_ids and a["iscrowd"] == 0
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
            assert 0 < a["area"] <= w * h
        assert {c["image_id"] for c in captions["annotations"]} == ids[split]
    assert not ids["train"] & ids["val"]
    rows = _load(world["train_captions"])
    coco_rows = _load(world["captions_train"])["annotations"]
    assert rows == [{"image_id": c["image_id"], "caption": c["caption"]} for c in coco_rows]
    assert len(rows) == SMALL["num_train"] * SMALL["captions_per_image"]
    val_images = _load(world["val_images"])
    assert [v["image_id"] for v in val_images] == sorted(ids["val"])
    meta = _load(world["meta"])
    assert meta["params"]["seed"] == 3 and [c["name"] for c in meta["classes"]] == list(CLASS_NAMES)


def test_every_caption_names_every_object_and_nothing_else(world):
    plural_to_name = {c.plural: c.name for c in SHAPE_CLASSES}
    present = _present_classes(world)
    for split in ("train", "val"):
        for row in _load(world[f"captions_{split}"])["annotations"]:
            words = re.findall(r"[a-z]+", row["caption"].lower())
            named = {plural_to_name.get(w, w) for w in words} & set(CLASS_NAMES)
            assert named == present[row["image_id"]], row


def test_synonyms_file_parses_with_the_chair_rule(world):
    lines = Path(world["synonyms"]).read_text(encoding="utf-8").splitlines()
    entries = [line.strip().split(", ") for line in lines]
    assert [e[0] for e in entries] == list(CLASS_NAMES)
    flat = [word for line in entries for word in line]
    assert len(flat) == len(set(flat)) and all(w == w.strip() and " " not in w for w in flat)
    assert all(2 <= len(line) <= 4 for line in entries)  # canonical name + 1-3 synonyms


def test_pope_files_follow_the_pope_construction(world):
    present = _present_classes(world)
    meta = _load(world["meta"])
    frequency = meta["class_image_counts"]
    pairs = meta["pair_image_counts"]
    rank = {name: i for i, name in enumerate(CLASS_NAMES)}
    val_ids = {v["image_id"] for v in _load(world["val_images"])}
    positives_by_split = {}
    for split in ("random", "popular", "adversarial"):
        rows = _jsonl(world[f"pope_{split}"])
        assert [r["question_id"] for r in rows] == list(range(1, len(rows) + 1))
        assert sum(r["label"] == "yes" for r in rows) == sum(r["label"] == "no" for r in rows)
        by_image: dict[int, dict[str, list[str]]] = defaultdict(lambda: {"yes": [], "no": []})
        for r in rows:
            name = re.fullmatch(r"Is there an? (\w+) in the image\?", r["text"]).group(1)
            by_image[int(r["image"].split(".")[0])][r["label"]].append(name)
        assert set(by_image) == val_ids
        for image_id, asked in by_image.items():
            here = present[image_id]
            absent = [c for c in CLASS_NAMES if c not in here]
            assert set(asked["yes"]) <= here and len(set(asked["yes"])) == len(asked["yes"])
            assert len(asked["yes"]) == min(3, len(here)) == len(asked["no"])
            assert not set(asked["no"]) & here and len(set(asked["no"])) == len(asked["no"])
            n = len(asked["no"])
            if split == "popular":
                assert asked["no"] == sorted(absent, key=lambda c: (-frequency[c], rank[c]))[:n]
            if split == "adversarial":
                score = {c: sum(pairs[p][c] for p in here) for c in absent}
                best = sorted(absent, key=lambda c: (-score[c], -frequency[c], rank[c]))[:n]
                assert asked["no"] == best
        positives_by_split[split] = {k: v["yes"] for k, v in by_image.items()}
    assert positives_by_split["random"] == positives_by_split["popular"] == positives_by_split["adversarial"]


def test_meta_counts_match_the_annotations(world):
    present = _present_classes(world)
    meta = _load(world["meta"])
    for name in CLASS_NAMES:
        assert meta["class_image_counts"][name] == sum(name in p for p in present.values())
    anchor, partner = COOCCURRENCE_PAIRS[0]
    both = sum(anchor in p and partner in p for p in present.values())
    assert meta["pair_image_counts"][anchor][partner] == both == meta["pair_image_counts"][partner][anchor]


# ---------------------------------------------------------------------------------------------
# Co-occurrence bias


@pytest.mark.parametrize("strength", [0.9, 0.3])
def test_partner_given_anchor_matches_the_requested_strength(strength):
    scenes = [{o.name for o in sample_scene(np.random.default_rng([11, i, 0]), 64, strength)}
              for i in range(3000)]
    for anchor, partner in COOCCURRENCE_PAIRS:
        with_anchor = [s for s in scenes if anchor in s]
        rate = sum(partner in s for s in with_anchor) / len(with_anchor)
        # about 200-300 anchor images per pair: the binomial standard error is <= 0.035
        assert abs(rate - strength) < 0.1, (anchor, partner, rate)
        # the partner is also common on its own (that makes the bias a shortcut worth learning)
        assert sum(partner in s and anchor not in s for s in scenes) > len(with_anchor)


def test_built_world_shows_the_bias(world):
    present = _present_classes(world)
    rates = []
    for anchor, partner in COOCCURRENCE_PAIRS:
        with_anchor = [p for p in present.values() if anchor in p]
        rates.append(sum(partner in p for p in with_anchor) / len(with_anchor))
    assert 0.8 < float(np.mean(rates)) <= 1.0


def test_scene_objects_fit_the_image():
    for i in range(200):
        for obj in sample_scene(np.random.default_rng([2, i, 0]), 64, 0.9):
            assert isinstance(obj, ShapeObject) and obj.name in CLASS_BY_NAME
            assert obj.radius < obj.x < 64 - obj.radius and obj.radius < obj.y < 64 - obj.radius


# ---------------------------------------------------------------------------------------------
# The project's scorers and datasets read the files


def test_chair_scorer_reads_the_world(world):
    from minigpt4.eval.chair import CHAIRScorer, build_ground_truth, score_captions

    scorer = CHAIRScorer(world["synonyms"])
    gt = build_ground_truth(Path(world["root"]) / "annotations", cache=None, scorer=scorer)
    present = _present_classes(world)
    assert gt == present
    rows = [{"image_id": c["image_id"], "caption": c["caption"]}
            for c in _load(world["captions_val"])["annotations"]]
    reference = score_captions(rows, gt, scorer)
    assert reference["chair_s"] == 0.0 and reference["chair_i"] == 0.0 and reference["recall"] == 1.0
    # A caption naming an absent partner is a hallucination; a synonym maps to its class.
    anchor, partner = COOCCURRENCE_PAIRS[0]
    image_id = next(i for i, p in present.items() if anchor in p and partner not in p and "ellipse" not in p)
    caption = f"a red {anchor} and two blue {CLASS_BY_NAME[partner].plural} and an oval"
    result = score_captions([{"image_id": image_id, "caption": caption}], gt, scorer)
    assert result["per_caption"][0]["hallucinated"] == [partner, "ellipse"]


def test_pope_scorer_reads_the_world(world, tmp_path):
    from minigpt4.eval.pope import score_pope

    questions = [world[f"pope_{split}"] for split in ("random", "popular", "adversarial")]
    answers = []
    for path in questions:
        answer_path = tmp_path / Path(path).name
        answer_path.write_text("".join(
            json.dumps({"question_id": q["question_id"], "answer": "Yes" if q["label"] == "yes" else "No"}) + "\n"
            for q in _jsonl(path)))
        answers.append(answer_path)
    result = score_pope(questions, answers)
    assert set(result["splits"]) == {"random", "popular", "adversarial"}
    assert all(s["accuracy"] == 1.0 and s["yes_ratio"] == 0.5 for s in result["splits"].values())


def test_caption_dataset_reads_the_training_file(world):
    from minigpt4.datasets.caption import CaptionJsonDataset

    dataset = CaptionJsonDataset(world["train_captions"], world["images"],
                                 vis_processor=lambda image: np.asarray(image), text_processor=str.strip)
    assert len(dataset) == SMALL["num_train"] * SMALL["captions_per_image"]
    sample = dataset[4]
    assert sample["image"].shape == (64, 64, 3) and sample["answer"]


def test_command_line_script(tmp_path):
    out = tmp_path / "world"
    command = [sys.executable, str(REPO / "scripts" / "make_shapes_world.py"), "--out", str(out),
               "--num-train", "6", "--num-val", "3", "--seed", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(list((out / "images").glob("*.jpg"))) == 9
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "overwrite" in again.stderr
