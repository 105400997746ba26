"""Shapes world: a procedural, CPU-scale object-hallucination testbed written in COCO's file formats.

Each image is a light, noisy background with 1-4 (rarely 5 or more) coloured shapes: 15 classes,
6 colours, small or big. Like COCO, some classes come in pairs: when the anchor of a pair is in an
image, its partner is there with probability `cooccurrence` (and the partner is also common on its
own). A captioner trained on these captions learns to mention the partner whenever it sees the
anchor, even where the partner is absent: the co-occurrence hallucination that CHAIR and POPE's
adversarial split measure.

`build_shapes_world(out_dir)` writes the files the real pipeline reads (see `build_shapes_world`);
everything is a deterministic function of the arguments, so equal arguments give byte-identical files.

Randomness: every image, caption and question draws from its own numpy Generator seeded with
(seed, image index, stream), so one image's content never depends on how many others were made
before it, and a caption depends only on (seed, image index, template index).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from minigpt4.shapes.world.drawings import SHAPE_PRIMITIVES, shape_mask

VERSION = 1
# meta.json's "generator": the module's name when the format was made (minigpt4/datasets/shapes_world.py); kept
# so that a world built today is byte-identical to one built before the module moved.
GENERATOR = "minigpt4.datasets.shapes_world"
JPEG_QUALITY = 95
MAX_OBJECTS = 4
POPE_QUESTIONS_PER_SIDE = 3  # per image: up to 3 "yes" questions and as many "no" questions
POPE_SPLITS = ("random", "popular", "adversarial")

# Streams of the per-image Generators (see the module docstring).
_SCENE, _RENDER, _TEMPLATES, _POPE_POSITIVE, _POPE_RANDOM, _CAPTION = 0, 1, 2, 3, 4, 100


@dataclass(frozen=True)
class ShapeClass:
    name: str  # canonical CHAIR name; pattern's singularizer maps it and `plural` back to itself
    plural: str
    synonyms: tuple[str, ...]  # extra CHAIR vocabulary entries (singular forms)
    weight: float  # relative base frequency before co-occurrence insertion


# Ordered from common to rare, so POPE's "popular" negatives are a meaningful choice.
SHAPE_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("circle", "circles", ("disc", "dot"), 10.0),
    ShapeClass("square", "squares", ("box", "block"), 9.0),
    ShapeClass("star", "stars", ("pentagram",), 8.0),
    ShapeClass("tree", "trees", ("pine", "fir"), 7.0),
    ShapeClass("ring", "rings", ("hoop", "donut", "loop"), 6.0),
    ShapeClass("triangle", "triangles", ("wedge",), 5.5),
    ShapeClass("heart", "hearts", ("valentine",), 5.0),
    ShapeClass("diamond", "diamonds", ("gem", "lozenge"), 4.5),
    ShapeClass("hexagon", "hexagons", ("hex",), 4.0),
    ShapeClass("bar", "bars", ("stripe", "strip", "rod"), 3.5),
    ShapeClass("ellipse", "ellipses", ("oval", "egg"), 3.0),
    ShapeClass("moon", "moons", ("crescent",), 3.0),
    ShapeClass("house", "houses", ("hut", "cottage"), 3.0),
    ShapeClass("arrow", "arrows", ("pointer", "dart"), 3.0),
    ShapeClass("bolt", "bolts", ("lightning", "zigzag"), 2.5),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in SHAPE_CLASSES)
CLASS_BY_NAME = {c.name: c for c in SHAPE_CLASSES}

# (anchor, partner): P(partner in image | anchor in image) = cooccurrence.
COOCCURRENCE_PAIRS: tuple[tuple[str, str], ...] = (("moon", "star"), ("house", "tree"), ("arrow", "ring"))

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35), "green": (35, 150, 60), "blue": (40, 75, 215),
    "yellow": (235, 195, 15), "purple": (135, 55, 175), "black": (25, 25, 25),
}
SIZES = ("small", "big")
RADIUS_FRACTION = {"small": 0.11, "big": 0.19}  # of the image side

CAPTION_TEMPLATES: tuple[str, ...] = (
    "{objects}.",
    "There {be} {objects}.",
    "An image with {count} {shapes}: {objects}.",
    "In this picture we can see {objects}.",
    "{objects} on a plain background.",
    "A simple drawing of {objects}.",
    "The picture shows {objects}.",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}


@dataclass(frozen=True)
class ShapeObject:
    name: str
    colour: str
    size: str
    x: float  # centre, pixels
    y: float
    radius: float  # pixels


# ---------------------------------------------------------------------------------------------
# Drawing (the classes' drawings are in drawings.py)

assert set(SHAPE_PRIMITIVES) == set(CLASS_NAMES), "every class needs a drawing"


def object_mask(obj: ShapeObject, size: int) -> np.ndarray:
    """uint8 [size, size] coverage of one object (0..255, anti-aliased), ignoring occlusion."""
    return shape_mask(obj.name, obj.x, obj.y, obj.radius, size)


def _render(objects: Sequence[ShapeObject], size: int, rng: np.random.Generator):
    tint = rng.integers(200, 241, size=3)  # light background, slightly tinted per image
    pixels = tint + rng.normal(0.0, 6.0, size=(size, size, 3))
    masks = []
    for obj in objects:  # later objects are drawn over earlier ones
        colour = np.asarray(COLOURS[obj.colour]) + rng.integers(-12, 13, size=3)
        mask = object_mask(obj, size)
        alpha = mask[..., None].astype(np.float64) / 255.0
        pixels = pixels * (1.0 - alpha) + colour * alpha
        masks.append(mask)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return image, masks


def render_image(objects: Sequence[ShapeObject], size: int, rng: np.random.Generator) -> Image.Image:
    """The RGB image of a scene; `rng` draws the background tint/noise and per-object colour jitter."""
    return _render(objects, size, rng)[0]


# ---------------------------------------------------------------------------------------------
# Scenes


def _sample_classes(rng: np.random.Generator, cooccurrence: float) -> list[str]:
    weights = np.asarray([c.weight for c in SHAPE_CLASSES])
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    names = [CLASS_NAMES[i] for i in rng.choice(len(CLASS_NAMES), size=count, p=weights / weights.sum())]
    paired = {name for pair in COOCCURRENCE_PAIRS for name in pair}
    for anchor, partner in COOCCURRENCE_PAIRS:
        if anchor not in names:
            continue
        # Decide the partner's presence afresh so that P(partner | anchor) is exactly `cooccurrence`
        # rather than that plus the chance of drawing it anyway.
        names = [n for n in names if n != partner]
        if rng.random() >= cooccurrence:
            continue
        if len(names) < MAX_OBJECTS:
            names.append(partner)
            continue
        # Full image: the partner takes the place of an object outside every pair (no other pair's
        # statistics move), else of a second copy of some class (no class disappears). If neither
        # exists (about 0.3% of images) the image gets one object more than MAX_OBJECTS.
        free = [i for i, n in enumerate(names) if n not in paired]
        if not free:
            free = [i for i, n in enumerate(names) if names.index(n) != i]
        if free:
            names[free[int(rng.integers(len(free)))]] = partner
        else:
            names.append(partner)
    return names


def sample_scene(rng: np.random.Generator, size: int, cooccurrence: float) -> list[ShapeObject]:
    """Classes (with the co-occurrence rule), attributes and non-overlapping-ish positions."""
    names = _sample_classes(rng, cooccurrence)
    colour_names = list(COLOURS)
    specs = []
    for name in names:
        colour = colour_names[int(rng.integers(len(colour_names)))]
        size_word = SIZES[int(rng.integers(len(SIZES)))]
        radius = RADIUS_FRACTION[size_word] * size * float(rng.uniform(0.9, 1.1))
        specs.append((name, colour, size_word, radius))
    objects: list[ShapeObject] = []
    # Big objects first: they are the hard ones to fit.
    for name, colour, size_word, radius in sorted(specs, key=lambda s: -s[3]):
        low, high = radius + 1.0, size - radius - 1.0
        best, best_gap = None, -np.inf
        for _ in range(60):  # rejection sampling; keep the least-overlapping try if none is free
            x, y = rng.uniform(low, high, size=2)
            gap = min((np.hypot(x - o.x, y - o.y) - radius - o.radius for o in objects), default=np.inf)
            if gap > best_gap:
                best, best_gap = (float(x), float(y)), gap
            if gap >= 1.0:
                break
        objects.append(ShapeObject(name, colour, size_word, round(best[0], 2), round(best[1], 2),
                                   round(radius, 2)))
    order = rng.permutation(len(objects))  # drawing (and annotation) order independent of size
    return [objects[i] for i in order]


# ---------------------------------------------------------------------------------------------
# Captions


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def make_caption(objects: Sequence[ShapeObject], template: int | str, rng: np.random.Generator) -> str:
    """One caption naming every object with its colour (and, half of the time, its size).

    `template` is an index into CAPTION_TEMPLATES or a template string with the fields {objects}
    and optionally {be}, {count}, {shapes}. Objects with the same mentioned attributes and class
    are grouped ("two red stars"); the order of mention is random.
    """
    if not objects:
        raise ValueError("make_caption: a scene needs at least one object")
    text = CAPTION_TEMPLATES[template] if isinstance(template, int) else template
    if "{objects}" not in text:
        raise ValueError(f"caption template {text!r} has no {{objects}} field")
    with_size = bool(rng.random() < 0.5)
    groups: Counter = Counter()
    for i in rng.permutation(len(objects)):  # first appearance in this order = order of mention
        obj = objects[i]
        groups[(obj.size if with_size else None, obj.colour, obj.name)] += 1
    phrases = []
    for (size_word, colour, name), n in groups.items():
        adjectives = " ".join(w for w in (size_word, colour) if w)
        if n == 1:
            phrases.append(with_article(f"{adjectives} {name}"))
        else:
            phrases.append(f"{NUMBER_WORDS[n]} {adjectives} {CLASS_BY_NAME[name].plural}")
    if len(phrases) == 1:
        listed = phrases[0]
    elif len(phrases) == 2:
        connective = ("and", "next to", "beside")[int(rng.integers(3))]
        listed = f"{phrases[0]} {connective} {phrases[1]}"
    else:
        listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    first_count = next(iter(groups.values()))
    caption = text.format(objects=listed, be="is" if first_count == 1 else "are",
                          count=NUMBER_WORDS[len(objects)], shapes="shape" if len(objects) == 1 else "shapes")
    return caption[0].upper() + caption[1:]


def caption_rng(seed: int, image_index: int, template_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, image_index, _CAPTION + template_index])


# ---------------------------------------------------------------------------------------------
# POPE questions


def pope_question(name: str) -> str:
    return f"Is there {with_article(name)} in the image?"


def build_pope_questions(
    val_scenes: Sequence[tuple[int, int, list[str]]],
    class_image_counts: dict[str, int],
    pair_counts: dict[str, dict[str, int]],
    seed: int,
    per_side: int = POPE_QUESTIONS_PER_SIDE,
) -> dict[str, list[dict]]:
    """POPE's three splits over (image index, image id, present classes) of the val images.

    Per image, up to `per_side` present classes give "yes" questions (the same in every split) and as
    many absent classes give "no" questions: random = uniformly drawn; popular = the most frequent
    classes (images containing them, all splits); adversarial = the classes co-occurring most often
    with the present ones (summed over them). Ties: more frequent first, then class order.
    """
    rank = {name: i for i, name in enumerate(CLASS_NAMES)}
    splits: dict[str, list[dict]] = {split: [] for split in POPE_SPLITS}
    for image_index, image_id, present in val_scenes:
        present_set = set(present)
        classes = sorted(present_set, key=rank.__getitem__)
        rng = np.random.default_rng([seed, image_index, _POPE_POSITIVE])
        positives = [classes[i] for i in sorted(rng.permutation(len(classes))[:per_side])]
        absent = [name for name in CLASS_NAMES if name not in present_set]
        n = len(positives)
        random_rng = np.random.default_rng([seed, image_index, _POPE_RANDOM])
        by_frequency = sorted(absent, key=lambda c: (-class_image_counts[c], rank[c]))
        negatives = {
            "random": [absent[i] for i in random_rng.permutation(len(absent))[:n]],
            "popular": by_frequency[:n],
            "adversarial": sorted(absent, key=lambda c: (-sum(pair_counts[p][c] for p in present_set),
                                                         -class_image_counts[c], rank[c]))[:n],
        }
        for split in POPE_SPLITS:
            for positive, negative in zip(positives, negatives[split]):  # yes, no, yes, no, ...
                for name, label in ((positive, "yes"), (negative, "no")):
                    splits[split].append({
                        "question_id": len(splits[split]) + 1, "image": f"{image_id:0>12}.jpg",
                        "text": pope_question(name), "label": label,
                    })
    return splits


# ---------------------------------------------------------------------------------------------
# Building the world


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to rebuild it")
        if not (out_dir / "meta.json").is_file():
            raise FileExistsError(f"{out_dir} is not empty and has no meta.json of an earlier shapes-world "
                                  "build; refusing to delete anything in it")
        # Remove what an earlier build wrote (a smaller rebuild must not leave stale images behind).
        for folder in ("images", "pope", "annotations"):
            for path in (out_dir / folder).glob("*") if (out_dir / folder).is_dir() else ():
                if path.suffix in (".jpg", ".jsonl", ".json"):
                    path.unlink()
    for folder in ("images", "annotations", "pope"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)


def _check_world_args(num_train: int, num_val: int, image_size: int, cooccurrence: float,
                      val_cooccurrence: float, captions_per_image: int) -> None:
    if num_train < 1 or num_val < 1:
        raise ValueError(f"need num_train >= 1 and num_val >= 1, got {num_train} and {num_val}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    for name, value in (("cooccurrence", cooccurrence), ("val_cooccurrence", val_cooccurrence)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {value}")
    if not 1 <= captions_per_image <= len(CAPTION_TEMPLATES):
        raise ValueError(
            f"captions_per_image must be in 1..{len(CAPTION_TEMPLATES)}, got {captions_per_image}"
        )


def _instance_rows(objects: Sequence[ShapeObject], masks: Sequence[np.ndarray], image_id: int,
                   first_id: int) -> list[dict]:
    """COCO instance annotations of one image; the box and area are those of the mask's ink (>= 128)."""
    rows = []
    for offset, (obj, mask) in enumerate(zip(objects, masks)):
        ys, xs = np.nonzero(mask >= 128)
        x0, y0 = (int(xs.min()), int(ys.min())) if len(xs) else (int(obj.x), int(obj.y))
        x1, y1 = (int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (x0, y0)
        rows.append({
            "id": first_id + offset, "image_id": image_id, "category_id": CLASS_NAMES.index(obj.name) + 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(len(xs)), "iscrowd": 0,
            "attributes": {"colour": obj.colour, "size": obj.size},
        })
    return rows


def _image_captions(objects: Sequence[ShapeObject], seed: int, index: int, count: int) -> list[str]:
    """`count` captions of one image from distinct templates, drawn per image, in template order."""
    templates = np.random.default_rng([seed, index, _TEMPLATES]).permutation(len(CAPTION_TEMPLATES))
    return [make_caption(objects, template, caption_rng(seed, index, template))
            for template in sorted(int(t) for t in templates[:count])]


def _draw_images(out: Path, num_train: int, num_val: int, seed: int, image_size: int, cooccurrence: float,
                 val_cooccurrence: float, captions_per_image: int) -> tuple[dict, list]:
    """Sample, render, save and caption every image (train first, ids from 1). Returns the COCO rows per
    split ({"images", "instances", "captions"}) and (split, index, id, classes) per image. Annotation ids
    run on across the splits, as they are unique in the whole world."""
    coco = {split: {"images": [], "instances": [], "captions": []} for split in ("train", "val")}
    present_by_image = []
    for index in range(num_train + num_val):
        split = "train" if index < num_train else "val"
        image_id, file_name = index + 1, f"{index + 1:0>12}.jpg"
        objects = sample_scene(np.random.default_rng([seed, index, _SCENE]), image_size,
                               cooccurrence if split == "train" else val_cooccurrence)
        image, masks = _render(objects, image_size, np.random.default_rng([seed, index, _RENDER]))
        image.save(out / "images" / file_name, "JPEG", quality=JPEG_QUALITY)
        rows = coco[split]
        rows["images"].append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        first_id = sum(len(r["instances"]) for r in coco.values()) + 1
        rows["instances"].extend(_instance_rows(objects, masks, image_id, first_id))
        first_id = sum(len(r["captions"]) for r in coco.values()) + 1
        rows["captions"].extend({"id": first_id + offset, "image_id": image_id, "caption": caption}
                                for offset, caption in enumerate(_image_captions(objects, seed, index,
                                                                                 captions_per_image)))
        present_by_image.append((split, index, image_id, [o.name for o in objects]))
    return coco, present_by_image


def _class_statistics(present_by_image: Sequence[tuple[str, int, int, list[str]]]) -> tuple[dict, dict]:
    """Images containing each class, and each pair of classes, over every image of both splits (POPE's
    popular/adversarial negatives and meta.json)."""
    class_image_counts = {name: 0 for name in CLASS_NAMES}
    pair_counts = {a: {b: 0 for b in CLASS_NAMES} for a in CLASS_NAMES}
    for _, _, _, names in present_by_image:
        present = set(names)
        for a in present:
            class_image_counts[a] += 1
            for b in present - {a}:
                pair_counts[a][b] += 1
    return class_image_counts, pair_counts


def _write_coco_annotations(out: Path, coco: dict[str, dict[str, list[dict]]], seed: int) -> dict[str, Path]:
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]
    paths = {}
    for split in ("train", "val"):
        for kind in ("instances", "captions"):
            path = out / "annotations" / f"{kind}_{split}2014.json"
            paths[f"{kind}_{split}"] = path
            data = {"info": {"description": f"shapes world v{VERSION}, seed {seed}"},
                    "images": coco[split]["images"], "annotations": coco[split][kind]}
            if kind == "instances":
                data["categories"] = categories
            _write_json(path, data)
    return paths


def _write_caption_files(out: Path, coco: dict[str, dict[str, list[dict]]]) -> dict[str, Path]:
    """The training captions (AdaVIB/LURE format), CHAIR's synonym list and CHAIR's captioning set."""
    paths = {"train_captions": out / "train_captions.json", "synonyms": out / "synonyms.txt",
             "val_images": out / "val_images.json"}
    _write_json(paths["train_captions"], [{"image_id": row["image_id"], "caption": row["caption"]}
                                          for row in coco["train"]["captions"]])
    paths["synonyms"].write_text("".join(", ".join((c.name, *c.synonyms)) + "\n" for c in SHAPE_CLASSES),
                                 encoding="utf-8")
    _write_json(paths["val_images"], [{"image_id": img["id"], "image": img["file_name"]}
                                      for img in coco["val"]["images"]])
    return paths


def _write_pope_files(out: Path, present_by_image: Sequence[tuple[str, int, int, list[str]]],
                      class_image_counts: dict[str, int], pair_counts: dict[str, dict[str, int]],
                      seed: int) -> dict[str, Path]:
    val_scenes = [(index, image_id, names) for split, index, image_id, names in present_by_image if split == "val"]
    paths = {}
    for split, rows in build_pope_questions(val_scenes, class_image_counts, pair_counts, seed).items():
        paths[f"pope_{split}"] = out / "pope" / f"{split}.jsonl"
        paths[f"pope_{split}"].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def _world_meta(params: dict, class_image_counts: dict[str, int], pair_counts: dict[str, dict[str, int]],
                files: dict[str, str]) -> dict:
    return {
        "generator": GENERATOR, "version": VERSION,
        "params": {**params, "max_objects": MAX_OBJECTS, "pope_questions_per_side": POPE_QUESTIONS_PER_SIDE,
                   "jpeg_quality": JPEG_QUALITY},
        "classes": [asdict(c) for c in SHAPE_CLASSES],
        "cooccurrence_pairs": [list(pair) for pair in COOCCURRENCE_PAIRS],
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "sizes": {name: RADIUS_FRACTION[name] for name in SIZES},
        "caption_templates": list(CAPTION_TEMPLATES),
        "splits": {"train": {"first_id": 1, "count": params["num_train"]},
                   "val": {"first_id": params["num_train"] + 1, "count": params["num_val"]}},
        "class_image_counts": class_image_counts,
        "pair_image_counts": pair_counts,
        "files": files,
    }


def build_shapes_world(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 3000,
    num_val: int = 300,
    seed: int = 0,
    image_size: int = 64,
    cooccurrence: float = 0.9,
    captions_per_image: int = 3,
    overwrite: bool = False,
    val_cooccurrence: float | None = None,
) -> dict[str, str]:
    """Write a shapes world to out_dir and return {what: path}. Files (ids unique across splits):

    images/{id:0>12}.jpg; train_captions.json ([{"image_id", "caption"}], AdaVIB/LURE format);
    annotations/{instances,captions}_{train,val}2014.json (COCO); synonyms.txt (CHAIR format);
    pope/{random,popular,adversarial}.jsonl; val_images.json ([{"image_id", "image"}], the CHAIR
    captioning set); meta.json (parameters, classes, pairs, class statistics).

    val_cooccurrence (default: `cooccurrence`) sets P(partner | anchor) in the val split alone. The train
    split, and so anything trained on it, is the same for every value: with 0.0 every anchor in a val image
    comes without its partner, a probe of co-occurrence hallucination (the partner mentioned anyway).
    """
    if val_cooccurrence is None:
        val_cooccurrence = cooccurrence
    params = {"num_train": num_train, "num_val": num_val, "seed": seed, "image_size": image_size,
              "cooccurrence": cooccurrence, "val_cooccurrence": val_cooccurrence,
              "captions_per_image": captions_per_image}  # meta.json's order
    _check_world_args(num_train, num_val, image_size, cooccurrence, val_cooccurrence, captions_per_image)
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    coco, present_by_image = _draw_images(out, **params)
    class_image_counts, pair_counts = _class_statistics(present_by_image)
    paths = {"root": out, "images": out / "images", **_write_caption_files(out, coco), "meta": out / "meta.json",
             **_write_coco_annotations(out, coco, seed),
             **_write_pope_files(out, present_by_image, class_image_counts, pair_counts, seed)}
    files = {key: str(path.relative_to(out)) for key, path in paths.items() if key != "root"}
    _write_json(paths["meta"], _world_meta(params, class_image_counts, pair_counts, files))
    return {key: str(path) for key, path in paths.items()}
