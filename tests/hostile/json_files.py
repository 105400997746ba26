"""Hostile JSON / JSONL files: caption JSON, POPE questions and answers, CHAIR captions and image lists, COCO
annotations and predictions, malformed, mistyped, with NaN / Infinity, not UTF-8, or with a byte-order mark; POPE
answers keyed to other questions; metrics.json files given to the results table, and output folders given to the
paired comparison, with wrong types or missing parts."""
from __future__ import annotations

import json
from functools import partial
from typing import Any

from _hostile import TINY_RECIPE, Case, Env, Exits2, Holds, Raises, caption_json, no_model_build, write_file

from minigpt4.common.jsonfiles import DataFileError
from minigpt4.eval import chair as chair_scorer
from minigpt4.eval import pope as pope_scorer
from minigpt4.eval.generate import read_predictions
from minigpt4.eval.settings import ChairSettings, EvalSettings


def pope_questions(text: str | bytes, env: Env, require_text: bool = False) -> list[dict]:
    return pope_scorer.load_questions(write_file(env, "random.jsonl", text), require_text=require_text)


def pope_answers(text: str | bytes, env: Env) -> list[str]:
    questions_path = write_file(env, "random.jsonl", "".join(
        json.dumps({"question_id": q, "image": "a.jpg", "text": "?", "label": "yes"}) + "\n" for q in (1, 2)))
    questions = pope_scorer.load_questions(questions_path)
    return pope_scorer.match_answers(questions, questions_path, write_file(env, "answers.jsonl", text))


def chair_captions(text: str | bytes, env: Env) -> list[dict]:
    return chair_scorer.load_captions(write_file(env, "captions.jsonl", text))


def predictions(text: str | bytes, env: Env) -> dict:
    return read_predictions(str(write_file(env, "pope_random_answers.jsonl", text)))


def chair_image_list(text: str | bytes, env: Env) -> list[str]:
    from minigpt4.eval.benchmark_runs import chair_image_list as image_list
    from minigpt4.eval.protocol_runs import resolve_run

    path = write_file(env, "images.json", text)
    settings = EvalSettings(image_dir=str(env.tmp), chair=ChairSettings(images=str(path)))
    return image_list(settings, resolve_run(settings, "chair", "vicuna_v0"))


def chair_items_from(images: str | None, env: Env) -> list:
    """CHAIR generation items from an image list file with text `images`, or (None) a sample of an empty folder."""
    from minigpt4.eval.benchmark_runs import chair_items
    from minigpt4.eval.protocol_runs import resolve_run

    (env.tmp / "val2014").mkdir()
    path = None if images is None else str(write_file(env, "images.json", images))
    settings = EvalSettings(image_dir=str(env.tmp / "val2014"), chair=ChairSettings(images=path))
    return chair_items(settings, resolve_run(settings, "chair", "vicuna_v0"))


def results_table_cli(data: Any, env: Env) -> tuple[int, str]:
    """scripts/results_table.py's main on one metrics.json holding `data` (text as it is, anything else as JSON)."""
    from minigpt4.eval.results_table import main

    path = write_file(env, "metrics.json", data if isinstance(data, (str, bytes)) else json.dumps(data))
    return main([str(path)]), ""


def metrics_with(change) -> dict:
    """A metrics.json as evaluate.py writes it (CHAIR and three POPE splits), changed by `change`."""
    ci = {"ci": {"accuracy": [0.8, 0.9], "f1": [0.8, 0.9]}, "n_resamples": 100, "level": 0.95}
    split = {"n": 30, "accuracy": 0.85, "precision": 0.8, "recall": 0.9, "f1": 0.85, "yes_ratio": 0.5,
             "tp": 14, "fp": 3, "tn": 12, "fn": 1, "bootstrap": ci}
    data = {"model": "m", "projector": "linear", "protocol": "p",
            "chair": {"chair_s": 0.2, "chair_i": 0.06, "recall": 0.9, "mean_length": 17.4, "n_images": 10,
                      "bootstrap": {"ci": {"chair_s": [0.0, 0.45], "mean_length": [15.6, 19.4]}}},
            "pope": {"rule": "reference", "splits": {name: json.loads(json.dumps(split))
                                                     for name in ("random", "popular", "adversarial")},
                     "mean": {"accuracy": 0.85, "f1": 0.85}}}
    change(data)
    return data


def _lines(*rows: Any) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def coco_instances(text: str, env: Env) -> dict:
    ann = env.tmp / "annotations"
    ann.mkdir()
    write_file(env, "annotations/instances_val2014.json", text)
    write_file(env, "annotations/captions_val2014.json", json.dumps({"images": [], "annotations": []}))
    return chair_scorer.build_ground_truth(ann)


def train_with_captions(data: bytes, env: Env) -> tuple[int, str]:
    """train.py on the tiny recipe with `data` as its caption JSON: the dataset is built before any model."""
    import train

    ann = write_file(env, "captions.json", data)
    options = env.shared.tiny_data_options() + [f"datasets.caption_json.ann_path={ann}",
                                                f"run.output_dir={env.tmp / 'out'}"]
    with no_model_build():
        return train.main(["--cfg-path", TINY_RECIPE, "--options", *options]), ""


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark Windows editors put first
CAFE_LATIN1 = "caf\u00e9".encode("latin-1")  # not UTF-8: a lone 0xe9
NAN_CAPTIONS = b'[{"image_id": 1, "caption": "NaN bread"},\n{"image_id": 2, "caption": NaN}]'


Q = {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog?", "label": "yes"}

JSON_CASES = [
    # caption JSON (the AdaVIB/LURE training annotations)
    Case("json/caption/malformed-line",
         partial(caption_json, '[\n{"image_id": 1, "caption": "a"},\n{"image_id": 2,,}\n]'),
         Raises(ValueError, ("{tmp}/captions.json:3:", "malformed JSON"))),
    Case("json/caption/not-a-list", partial(caption_json, '{"image_id": 1, "caption": "a"}'),
         Raises(ValueError, ("captions.json", "expected a JSON list"))),
    Case("json/caption/missing-field", partial(caption_json, '[{"image_id": 1, "caption": "a"}, {"image_id": 2}]'),
         Raises(ValueError, ("captions.json[1]", "missing field 'caption'"))),
    Case("json/caption/caption-not-a-string", partial(caption_json, '[{"image_id": 1, "caption": 7}]'),
         Raises(ValueError, ("captions.json[0].caption", "expected a string"))),
    Case("json/caption/image-id-wrong-type", partial(caption_json, '[{"image_id": [1], "caption": "a"}]'),
         Raises(ValueError, ("captions.json[0].image_id", "expected an integer or a non-empty string"))),
    Case("json/caption/duplicate-image-ids",
         partial(caption_json, '[{"image_id": 1, "caption": "a cat"}, {"image_id": 1, "caption": "a gray cat"}]'),
         Holds("two samples: COCO-style data has several captions per image")),
    # POPE questions
    Case("jsonl/pope-questions/malformed-line", partial(pope_questions, _lines(Q, '{"question_id": 2, "image"')),
         Raises(ValueError, ("{tmp}/random.jsonl:2:", "not valid JSON"))),
    Case("jsonl/pope-questions/missing-label",
         partial(pope_questions, _lines({k: v for k, v in Q.items() if k != "label"})),
         Raises(ValueError, ("random.jsonl:1:", "no 'label' key"))),
    Case("jsonl/pope-questions/missing-text-for-generation",
         partial(pope_questions, _lines({k: v for k, v in Q.items() if k != "text"}), require_text=True),
         Raises(ValueError, ("random.jsonl:1:", "no 'text' key"))),
    Case("jsonl/pope-questions/text-not-a-string", partial(pope_questions, _lines({**Q, "text": 3}), require_text=True),
         Raises(ValueError, ("random.jsonl:1:", "text must be the question as a non-empty string"))),
    Case("jsonl/pope-questions/question-id-null", partial(pope_questions, _lines({**Q, "question_id": None})),
         Raises(ValueError, ("random.jsonl:1:", "question_id must be an integer or a non-empty string, got None"))),
    Case("jsonl/pope-questions/image-wrong-type", partial(pope_questions, _lines({**Q, "image": ["a.jpg"]})),
         Raises(ValueError, ("random.jsonl:1:", "image must be an integer or a non-empty string"))),
    Case("jsonl/pope-questions/label-not-yes-no", partial(pope_questions, _lines({**Q, "label": "maybe"})),
         Raises(ValueError, ("random.jsonl:1:", "label must be 'yes' or 'no'"))),
    Case("jsonl/pope-questions/duplicate-question-id", partial(pope_questions, _lines(Q, {**Q, "image": "b.jpg"})),
         Raises(ValueError, ("random.jsonl:2:", "duplicate question_id 1 (first on line 1)"))),
    # POPE answers
    Case("jsonl/pope-answers/malformed-line", partial(pope_answers, _lines({"question_id": 1, "answer": "yes"}, "{")),
         Raises(ValueError, ("{tmp}/answers.jsonl:2:", "not valid JSON"))),
    Case("jsonl/pope-answers/duplicate-answer",
         partial(pope_answers, _lines(*({"question_id": q, "answer": "no"} for q in (1, 2, 2)))),
         Raises(ValueError, ("answers.jsonl:3:", "duplicate answer for question_id 2"))),
    Case("jsonl/pope-answers/answer-not-a-string",
         partial(pope_answers, _lines({"question_id": 1, "answer": True}, {"question_id": 2, "answer": "no"})),
         Raises(ValueError, ("answers.jsonl:1:", "answer must be a string"))),
    Case("jsonl/pope-answers/image-of-another-question",
         partial(pope_answers, _lines({"question_id": 1, "image": "b.jpg", "answer": "yes"},
                                      {"question_id": 2, "image": "a.jpg", "answer": "no"})),
         Raises(DataFileError, ("{tmp}/answers.jsonl:1: question_id 1: the answer is about image 'b.jpg'",
                                "is about image 'a.jpg'"))),
    Case("jsonl/pope-answers/same-image-in-another-folder",
         partial(pope_answers, _lines({"question_id": 1, "image": "/elsewhere/a.jpg", "answer": "yes"},
                                      {"question_id": 2, "image": "a.jpg", "answer": "no"})),
         Holds("the same file name in another folder is the same image")),
    Case("jsonl/pope-answers/missing-answer", partial(pope_answers, _lines({"question_id": 1, "answer": "no"})),
         Raises(ValueError, ("answers.jsonl", "no answer for 1 question(s)", "[2]"))),
    # CHAIR captions
    Case("jsonl/chair-captions/malformed-line", partial(chair_captions, _lines({"image_id": 1, "caption": "a"}, "{]")),
         Raises(ValueError, ("{tmp}/captions.jsonl:2:", "not valid JSON"))),
    Case("jsonl/chair-captions/missing-caption", partial(chair_captions, _lines({"image_id": 1})),
         Raises(ValueError, ("captions.jsonl:1:", "expected an object with 'image_id' and 'caption'"))),
    Case("jsonl/chair-captions/caption-not-a-string", partial(chair_captions, _lines({"image_id": 1, "caption": 5})),
         Raises(ValueError, ("captions.jsonl:1:", "'caption' must be a string"))),
    Case("jsonl/chair-captions/image-id-unreadable",
         partial(chair_captions, _lines({"image_id": "dog", "caption": "a"})),
         Raises(ValueError, ("captions.jsonl:1:", "cannot read a COCO image id from 'dog'"))),
    Case("jsonl/chair-captions/duplicate-image-id",
         partial(chair_captions, _lines({"image_id": 3, "caption": "a"}, {"image_id": "COCO_val2014_000000000003.jpg",
                                                                         "caption": "b"})),
         Holds("both rows kept and scored, as the reference CHAIR does (no de-duplication)")),
    Case("json/chair-image-list/malformed", partial(chair_image_list, '[{"image_id": 1},'),
         Raises(ValueError, ("eval.chair.images", "{tmp}/images.json:1:", "malformed JSON"))),
    # empty benchmark files: refused as empty (issue 13 item 6), before evaluate.py builds a model (config rows)
    Case("jsonl/pope-questions/empty-file", partial(pope_questions, ""),
         Raises(ValueError, ("{tmp}/random.jsonl: no questions",))),
    Case("json/chair-image-list/empty", partial(chair_items_from, "[]"),
         Raises(DataFileError, ("eval.chair.images: {tmp}/images.json lists no images", "CHAIR needs at least one"))),
    Case("json/chair-image-list/empty-image-dir", partial(chair_items_from, None),
         Raises(DataFileError, ("eval.image_dir: {tmp}/val2014 has no .jpg/.jpeg/.png file",))),
    # predictions written by evaluate.py (and read back to resume)
    Case("jsonl/predictions/malformed-line", partial(predictions, _lines({"key": "1", "answer": "a"}, "{x", "{}")),
         Raises(ValueError, ("{tmp}/pope_random_answers.jsonl:2:", "not valid JSON"))),
    Case("jsonl/predictions/missing-key", partial(predictions, _lines({"answer": "yes"})),
         Raises(ValueError, ("pope_random_answers.jsonl:1:", "with a 'key'"))),
    Case("jsonl/predictions/not-an-object", partial(predictions, _lines([1, 2])),
         Raises(ValueError, ("pope_random_answers.jsonl:1:", "expected a JSON object"))),
    Case("jsonl/predictions/duplicate-key",
         partial(predictions, _lines({"key": 7, "answer": "a"}, {"key": "7", "answer": "b"})),
         Raises(ValueError, ("pope_random_answers.jsonl:2:", "key '7' again (first on line 1)"))),
    # NaN / Infinity (Python's json reads them; JSON has no such numbers), other encodings, a byte-order mark
    Case("json/caption/nan-field", partial(caption_json, NAN_CAPTIONS),  # the "NaN" in a string is no match
         Raises(DataFileError, ("{tmp}/captions.json:2:28: NaN is not valid JSON",))),
    Case("json/caption/infinity-in-extra-field",
         partial(caption_json, '[{"image_id": 1, "caption": "a", "score": Infinity}]'),
         Raises(DataFileError, ("captions.json:1:", "Infinity is not valid JSON"))),
    Case("json/caption/not-utf8", partial(caption_json, b'[{"image_id": 1, "caption": "' + CAFE_LATIN1 + b'"}]'),
         Raises(DataFileError, ("{tmp}/captions.json:1: not UTF-8 text (byte 0xe9 at offset 32)",))),
    Case("json/caption/utf8-bom", partial(caption_json, BOM + b'[{"image_id": 1, "caption": "a"}]'),
         Holds("read as UTF-8, the mark dropped")),
    Case("json/caption/nan-field/train-cli", partial(train_with_captions, NAN_CAPTIONS),
         Exits2(("captions.json:2:28: NaN is not valid JSON",), prefix="error: ")),
    Case("json/caption/not-utf8/train-cli",
         partial(train_with_captions, b'[{"image_id": 1, "caption": "' + CAFE_LATIN1 + b'"}]'),
         Exits2(("captions.json:1: not UTF-8 text",), prefix="error: ")),
    Case("jsonl/pope-questions/nan-question-id",
         partial(pope_questions, _lines(Q, '{"question_id": NaN, "image": "a.jpg", "label": "yes"}')),
         Raises(DataFileError, ("{tmp}/random.jsonl:2:17: NaN is not valid JSON",))),
    Case("jsonl/pope-questions/not-utf8",
         partial(pope_questions, _lines({**Q, "text": "Is there a cafe?"}).encode().replace(b"cafe", CAFE_LATIN1)),
         Raises(DataFileError, ("random.jsonl:1: not UTF-8 text",))),
    Case("jsonl/pope-questions/utf8-bom", partial(pope_questions, BOM + _lines(Q).encode()),
         Holds("read as UTF-8, the mark dropped")),
    Case("jsonl/pope-answers/infinity",
         partial(pope_answers, _lines('{"question_id": 1, "answer": "yes", "logprob": -Infinity}')),
         Raises(DataFileError, ("{tmp}/answers.jsonl:1:", "-Infinity is not valid JSON"))),
    Case("jsonl/pope-answers/utf8-bom",
         partial(pope_answers, BOM + _lines(*({"question_id": q, "answer": "no"} for q in (1, 2))).encode()),
         Holds("read as UTF-8, the mark dropped")),
    Case("jsonl/chair-captions/nan-image-id", partial(chair_captions, _lines('{"image_id": NaN, "caption": "a"}')),
         Raises(DataFileError, ("{tmp}/captions.jsonl:1:14: NaN is not valid JSON",))),
    Case("jsonl/chair-captions/not-utf8",
         partial(chair_captions, b'{"image_id": 1, "caption": "' + CAFE_LATIN1 + b'"}\n'),
         Raises(DataFileError, ("captions.jsonl:1: not UTF-8 text",))),
    Case("jsonl/chair-captions/utf8-bom",
         partial(chair_captions, BOM + _lines({"image_id": 1, "caption": "a"}).encode()),
         Holds("read as UTF-8, the mark dropped")),
    Case("json/chair-image-list/nan", partial(chair_image_list, '[{"image_id": NaN}]'),
         Raises(DataFileError, ("eval.chair.images", "{tmp}/images.json:1:15: NaN is not valid JSON"))),
    Case("json/chair-image-list/utf8-bom", partial(chair_image_list, BOM + b'[{"image_id": 1}, {"image_id": 2}]'),
         Holds("read as UTF-8, the mark dropped")),
    Case("json/coco-annotations/nan", partial(coco_instances, '{"images": [], "annotations": [{"id": 1, '
                                                               '"image_id": 1, "category_id": NaN}]}'),
         Raises(DataFileError, ("{tmp}/annotations/instances_val2014.json:1:", "NaN is not valid JSON"))),
    Case("jsonl/predictions/nan", partial(predictions, _lines('{"key": "1", "answer": NaN}')),
         Raises(DataFileError, ("{tmp}/pope_random_answers.jsonl:1:", "NaN is not valid JSON"))),
    Case("jsonl/predictions/not-utf8", partial(predictions, b'{"key": "1", "answer": "' + CAFE_LATIN1 + b'"}\n'),
         Raises(DataFileError, ("pope_random_answers.jsonl:1: not UTF-8 text",))),
]


def _set(path: str, value: Any):
    """A change for metrics_with: the dotted key `path` set to `value`."""
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        data[last] = value
    return change


def _metrics_case(name: str, path: str, value: Any, *fragments: str) -> Case:
    return Case(f"json/metrics/{name}", partial(results_table_cli, metrics_with(_set(path, value))),
                Exits2(("metrics.json: " + fragments[0],) + fragments[1:], prefix="error: "))


# metrics.json given to scripts/results_table.py (and the exporter's --metrics): minigpt4/eval/metrics_file.py
JSON_CASES += [
    _metrics_case("chair-s-a-string", "chair.chair_s", "0.318",
                  "chair.chair_s: expected a number, got the string '0.318'"),
    _metrics_case("pope-splits-a-list", "pope.splits", [{"accuracy": 0.8, "f1": 0.8}],
                  "pope.splits: expected a JSON object (a mapping), got a list"),
    _metrics_case("interval-one-number", "chair.bootstrap.ci.chair_s", 0.1,
                  "chair.bootstrap.ci.chair_s: expected an interval [low, high] of two numbers, got the number 0.1"),
    _metrics_case("interval-three-numbers", "pope.splits.random.bootstrap.ci.f1", [0.1, 0.2, 0.3],
                  "pope.splits.random.bootstrap.ci.f1: expected an interval [low, high] of two numbers"),
    _metrics_case("interval-reversed", "chair.bootstrap.ci.chair_s", [0.45, 0.1],
                  "chair.bootstrap.ci.chair_s: expected an interval [low, high] with low <= high, "
                  "got the list [0.45, 0.1]"),
    _metrics_case("interval-in-percent", "pope.splits.popular.bootstrap.ci.accuracy", [80, 90],
                  "pope.splits.popular.bootstrap.ci.accuracy: expected an interval inside [0, 1]"),
    _metrics_case("interval-strings", "chair.bootstrap.ci.mean_length", ["15", "19"],
                  "chair.bootstrap.ci.mean_length: expected an interval [low, high] of two numbers"),
    _metrics_case("accuracy-a-boolean", "pope.splits.adversarial.accuracy", True,
                  "pope.splits.adversarial.accuracy: expected a number, got the boolean true"),
    _metrics_case("accuracy-in-percent", "pope.mean.accuracy", 85.0,
                  "pope.mean.accuracy: expected a number in [0.0, 1.0], got the number 85.0"),
    _metrics_case("split-not-an-object", "pope.splits.random", "0.85",
                  "pope.splits.random: expected a JSON object (a mapping), got the string '0.85'"),
    _metrics_case("count-a-float", "pope.splits.random.n", 30.5,
                  "pope.splits.random.n: expected an integer >= 0, got the number 30.5"),
    _metrics_case("chair-a-list", "chair", [0.2, 0.06], "chair: expected a JSON object (a mapping)"),
    _metrics_case("model-null", "model", None, "model: expected a non-empty string, got null"),
    _metrics_case("bootstrap-level-percent", "chair.bootstrap.level", 95,
                  "chair.bootstrap.level: expected a number in (0, 1), got the number 95"),
    Case("json/metrics/missing-chair-metric",
         partial(results_table_cli, metrics_with(lambda d: d["chair"].pop("recall"))),
         Exits2(("metrics.json: chair: has no 'recall'",), prefix="error: ")),
    Case("json/metrics/top-level-a-list", partial(results_table_cli, "[1, 2]"),
         Exits2(("metrics.json: expected a JSON object (a metrics.json written by evaluate.py), "
                 "got the list [1, 2]",), prefix="error: ")),
    Case("json/metrics/nan", partial(results_table_cli, '{"model": "m", "projector": "p", "protocol": "x", '
                                                        '"chair": {"chair_s": NaN}}'),
         Exits2(("metrics.json:1:", "NaN is not valid JSON"), prefix="error: ")),
    Case("json/metrics/as-evaluate-writes-it", partial(results_table_cli, metrics_with(lambda d: None)),
         Holds("read and tabulated, exit 0")),
]

EXPECTED_VALUES = {  # what the Holds rows above return
    "json/caption/duplicate-image-ids": 2,
    "jsonl/chair-captions/duplicate-image-id": [{"image_id": 3, "caption": "a"}, {"image_id": 3, "caption": "b"}],
    "json/caption/utf8-bom": 1,
    "jsonl/pope-questions/utf8-bom": [Q],
    "jsonl/pope-answers/utf8-bom": ["no", "no"],
    "jsonl/pope-answers/same-image-in-another-folder": ["yes", "no"],
    "jsonl/chair-captions/utf8-bom": [{"image_id": 1, "caption": "a"}],
    "json/chair-image-list/utf8-bom": ["1", "2"],
    "json/metrics/as-evaluate-writes-it": (0, ""),
}


def paired_cli(files: dict[str, str], env: Env) -> tuple[int, str]:
    """python -m minigpt4.eval.paired on an output folder holding `files`, compared with itself."""
    from minigpt4.eval.paired import main

    for name, text in files.items():
        write_file(env, name, text)
    return main([str(env.tmp), str(env.tmp), "--resamples", "10"]), ""


# output folders given to python -m minigpt4.eval.paired (minigpt4/eval/paired_runs.py)
JSON_CASES += [
    Case("json/paired/no-results", partial(paired_cli, {}),
         Exits2(("neither chair.json nor pope.json (an evaluate.py output folder?)",), prefix="error: ")),
    Case("json/paired/pope-json-without-files", partial(paired_cli, {"pope.json": '{"rule": "reference"}'}),
         Exits2(("pope.json: files: expected {'questions': [{'path': ...}], 'answers': [...]}",), prefix="error: ")),
    Case("json/paired/pope-json-rule-a-number",
         partial(paired_cli, {"pope.json": json.dumps({"rule": 1, "end_string": "###", "files": {
             "questions": [{"path": "q.jsonl"}], "answers": [{"path": "a.jsonl"}]}})}),
         Exits2(("pope.json: rule: expected a string",), prefix="error: ")),
    Case("json/paired/chair-row-without-ground-truth",
         partial(paired_cli, {"chair.json": json.dumps({"per_caption": [{"image_id": 1, "mentions": [],
                                                                         "hallucinated": []}]})}),
         Exits2(("chair.json: per_caption[0]: expected an object with image_id and the lists ground_truth",),
                prefix="error: ")),
    Case("json/paired/chair-json-malformed", partial(paired_cli, {"chair.json": '{"per_caption": [}'}),
         Exits2(("chair.json:1:", "malformed JSON"), prefix="error: ")),
]
