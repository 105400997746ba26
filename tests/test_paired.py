"""python -m minigpt4.eval.paired: only the same items under the same protocol are paired (issue 22).

The folders here are written as evaluate.py writes them (pope.json naming its question and answer files, chair.json
with per_caption rows, answers with their image hashes, a fingerprint next to each answers file), without a model.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from minigpt4.eval import paired_runs
from minigpt4.eval.paired import compare, compare_eval_dirs, main
from minigpt4.eval.paired_runs import NotPairedError

SPLITS = ("random", "adversarial")
IMAGES = ("000000003001.jpg", "000000003002.jpg", "000000003003.jpg")
THINGS = ("circle", "star", "square", "moon")
TRUTH = {3001: ["circle", "square"], 3002: ["star"], 3003: ["moon", "square"]}
FINGERPRINT = {"model.full_ckpt": "sha256:aa", "device": "cpu", "eval.system": "", "eval.num_beams": 1,
               "eval.prompt_format": "###Human: <Img><ImageHere></Img> {question} ###Assistant: ",
               "eval.vis_processor.image_size": 64, "eval.image_dir": "/data/images", "eval.feature_cache": "off"}
TASK_FINGERPRINT = {"pope": {"eval.pope.protocol": "shapes-pope", "eval.pope.max_new_tokens": 10,
                             "eval.pope.question_suffix": "", "eval.pope.min_new_tokens": 0},
                    "chair": {"eval.chair.protocol": "shapes-chair", "eval.chair.max_new_tokens": 64,
                              "eval.chair.question": "Describe this image."}}


def spec() -> dict:
    """Everything one evaluation folder holds, as plain data a test can change before `write_eval`."""
    questions = {split: [{"question_id": 4 * i + j + 1, "image": image, "text": f"Is there a {thing} in the image?",
                          "label": "yes" if (i + j + len(split)) % 2 else "no"}
                         for i, image in enumerate(IMAGES) for j, thing in enumerate(THINGS)] for split in SPLITS}
    return {"questions": questions, "answers": {split: [("yes" if q["question_id"] % 3 else "no") for q in qs]
                                                for split, qs in questions.items()},
            "captions": {image_id: f"a {' and a '.join(truth)} and a tree" for image_id, truth in TRUTH.items()},
            "truth": copy.deepcopy(TRUTH), "hashes": {image: f"{n:064x}" for n, image in enumerate(IMAGES, 1)},
            "fingerprint": dict(FINGERPRINT), "task_fingerprint": copy.deepcopy(TASK_FINGERPRINT),
            "pope": {"rule": "reference", "protocol_name": "shapes-pope", "decoding": "greedy"},
            "chair": {"protocol_name": "shapes-chair", "decoding": "greedy", "sentences": "keep"}}


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _fingerprint(folder: Path, answers: str, task: str, s: dict) -> None:
    fields = {**s["fingerprint"], **s["task_fingerprint"][task]}
    (folder / answers.replace(".jsonl", ".fingerprint.json")).write_text(json.dumps({"format": 1, "fields": fields}))


def _write_pope(folder: Path, s: dict) -> None:
    files = {"questions": [], "answers": []}
    for split, questions in s["questions"].items():
        q_path = _jsonl(folder / "questions" / f"{split}.jsonl", questions)
        name = f"pope_{split}_answers.jsonl"
        rows = [{"key": str(q["question_id"]), "question_id": q["question_id"], "image": q["image"],
                 "image_sha256": s["hashes"].get(q["image"]), "prompt": f"###Human: {q['text']} ###Assistant: ",
                 "answer": answer} for q, answer in zip(questions, s["answers"][split])]
        files["questions"].append({"path": q_path, "sha256": "0"})
        files["answers"].append({"path": _jsonl(folder / name, rows), "sha256": "0"})
        _fingerprint(folder, name, "pope", s)
    (folder / "pope.json").write_text(json.dumps({"benchmark": "pope", "end_string": "###", "files": files,
                                                  **s["pope"]}))


def _write_chair(folder: Path, s: dict) -> None:
    per_caption, rows = [], []
    for image_id, caption in s["captions"].items():
        mentions = [word for word in caption.split() if word in THINGS]
        per_caption.append({"image_id": image_id, "caption": caption, "mentions": mentions,
                            "ground_truth": s["truth"][image_id],
                            "hallucinated": [m for m in mentions if m not in s["truth"][image_id]]})
        rows.append({"key": str(image_id), "image_id": image_id, "answer": caption,
                     "image_sha256": s["hashes"].get(f"{image_id:012d}.jpg")})
    captions = _jsonl(folder / "chair_captions.jsonl", rows)
    _fingerprint(folder, "chair_captions.jsonl", "chair", s)
    (folder / "chair.json").write_text(json.dumps({"per_caption": per_caption, "captions_file": captions,
                                                   **s["chair"]}))


def write_eval(folder: Path, s: dict) -> Path:
    (folder / "questions").mkdir(parents=True)
    _write_pope(folder, s)
    _write_chair(folder, s)
    return folder


def refusal(tmp_path: Path, change, capsys) -> str:
    """B is A changed by `change`: the one-line refusal `python -m minigpt4.eval.paired A B` prints (exit 2)."""
    a = write_eval(tmp_path / "a", spec())
    s = spec()
    change(s)
    b = write_eval(tmp_path / "b", s)
    assert main([str(a), str(b), "--resamples", "50"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "cannot be paired" in err, err
    return err


def test_a_model_compared_with_itself_differs_by_nothing(tmp_path, capsys):
    a = write_eval(tmp_path / "a", spec())
    b = write_eval(tmp_path / "b", spec())
    result = compare(a, b, n_resamples=100)
    assert result.allowed_differences == []
    assert result.items == ("chair: 3 images; pope random: 12 questions of 3 images; "
                            "pope adversarial: 12 questions of 3 images")
    assert all(r["diff"] == 0 and r["ci"] == [0, 0] for r in result.metrics.values())
    assert main([str(a), str(b), "--resamples", "50", "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("paired over: chair: 3 images;")


def test_fewer_pope_questions_per_image_is_refused(tmp_path, capsys):
    """Issue 22: B asked 2 of the 4 questions of each image; the images are the same, the questions are not."""
    def fewer(s):
        for split in SPLITS:
            kept = [i for i, q in enumerate(s["questions"][split]) if q["question_id"] % 4 in (1, 2)]
            s["questions"][split] = [s["questions"][split][i] for i in kept]
            s["answers"][split] = [s["answers"][split][i] for i in kept]
    err = refusal(tmp_path, fewer, capsys)
    assert "pope random: 12 vs 6 question_ids scored (6 only in A, e.g. ['11', '12', '3'])" in err


def test_max_new_tokens_overridden_is_refused_unless_allowed(tmp_path, capsys):
    """Issue 22: B's CHAIR captions were cut at 8 tokens (recall -58 in the issue's run, reported as a model's)."""
    def shorter(s):
        s["task_fingerprint"]["chair"]["eval.chair.max_new_tokens"] = 8
        s["chair"]["protocol_overrides"] = {"eval.chair.max_new_tokens": {"protocol": 64, "used": 8}}
    err = refusal(tmp_path, shorter, capsys)
    assert "chair eval.chair.max_new_tokens: 64 (A) vs 8 (B)" in err and "--allow-different-protocol" in err
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([str(a), str(b), "--resamples", "50", "--allow-different-decoding"]) == 2  # not a decoding change
    capsys.readouterr()
    assert main([str(a), str(b), "--resamples", "50", "--allow-different-protocol"]) == 0
    header = capsys.readouterr().out.splitlines()[1]
    assert header.startswith("NOT THE SAME PROTOCOL") and "chair eval.chair.max_new_tokens: 64 (A) vs 8 (B)" in header


def test_a_setting_only_the_fingerprint_records_is_compared(tmp_path, capsys):
    """A setting that is no protocol override (another protocol record, say) is seen in the answers' fingerprints."""
    err = refusal(tmp_path, lambda s: s["task_fingerprint"]["pope"].update({"eval.pope.question_suffix": " Yes/no?"}),
                  capsys)
    assert 'pope eval.pope.question_suffix: "" (A) vs " Yes/no?" (B)' in err


def test_model_side_settings_may_differ(tmp_path):
    """Another model family: its own prompt wording and image processor under the same protocol, another device."""
    a = write_eval(tmp_path / "a", spec())
    s = spec()
    s["fingerprint"].update({"eval.prompt_format": "USER: <image>\n{question} ASSISTANT:", "device": "cuda",
                             "eval.vis_processor.image_size": 336, "model.full_ckpt": "sha256:bb"})
    assert compare(a, write_eval(tmp_path / "b", s), n_resamples=20).allowed_differences == []


@pytest.mark.parametrize("change,message", [
    (lambda s: s["pope"].update(rule="first-sentence"), 'pope eval.pope.rule: "reference" (A) vs "first-sentence"'),
    (lambda s: s["chair"].update(sentences="drop-unfinished"), 'chair eval.chair.sentences: "keep" (A) vs'),
    (lambda s: s["chair"].update(protocol_name="opera-chair-500"), 'chair eval.chair.protocol: "shapes-chair" (A)'),
    (lambda s: s["chair"].update(protocol_overrides={"eval.system": {"protocol": "", "used": "Be brief."}}),
     'chair eval.system: "(not recorded: the protocol\'s own)" (A) vs "Be brief." (B)'),
])
def test_another_scoring_rule_or_protocol_is_refused(tmp_path, capsys, change, message):
    assert message in refusal(tmp_path, change, capsys)


def test_another_decoding_is_allowed_only_by_its_flag(tmp_path, capsys):
    def vcd(s):
        for task in ("pope", "chair"):
            s[task]["decoding"] = "vcd(α=1,β=0.1,t=500,sample)"
            s["task_fingerprint"][task].update({"eval.decoding": "vcd", "eval.vcd.alpha": 1.0})
    err = refusal(tmp_path, vcd, capsys)
    assert 'pope decoding: "greedy" (A) vs "vcd(α=1,β=0.1,t=500,sample)" (B)' in err
    result = compare(tmp_path / "a", tmp_path / "b", n_resamples=20, allow_different_decoding=True)
    assert "pope eval.vcd.alpha: \"(not recorded: the protocol's own)\" (A) vs 1.0 (B)" in result.allowed_differences


@pytest.mark.parametrize("change,message", [
    # the same question ids about other images, or with other labels: another question file under the same ids
    (lambda s: s["questions"]["random"][2].update(image=IMAGES[1]),
     "pope random: 1 question_ids have another image / label, e.g. question_id 3: ('3001', 'no') (A) vs ('3002',"),
    (lambda s: s["questions"]["adversarial"][0].update(label="no"),  # it was "yes"
     "pope adversarial: 1 question_ids have another image / label, e.g. question_id 1: ('3001', 'yes') (A) vs "
     "('3001', 'no') (B)"),
    (lambda s: s["truth"][3002].append("circle"), "chair: 1 images have another ground truth, e.g. image 3002"),
    (lambda s: s["captions"].pop(3003), "chair: 3 vs 2 images scored (1 only in A, e.g. ['3003'])"),
    (lambda s: (s["questions"].pop("adversarial"), s["answers"].pop("adversarial")),
     "POPE splits ['adversarial', 'random'] (A) vs ['random'] (B)"),
    # a picture replaced under the same file name: the answers' image hashes differ
    (lambda s: s["hashes"].update({IMAGES[0]: "f" * 64}), "answered about other pictures (the image files' SHA-256"),
])
def test_other_items_are_refused_even_with_the_flags(tmp_path, capsys, change, message):
    assert message in refusal(tmp_path, change, capsys)
    with pytest.raises(NotPairedError, match="cannot be paired"):
        compare_eval_dirs(tmp_path / "a", tmp_path / "b", 20, allow_different_protocol=True,
                          allow_different_decoding=True)


def test_without_image_hashes_the_image_folders_must_agree(tmp_path, capsys):
    def unhashed(s):
        s["hashes"] = {}
    a = write_eval(tmp_path / "a", spec())
    s = spec()
    unhashed(s)
    b = write_eval(tmp_path / "b", s)
    assert compare(a, b, n_resamples=20).allowed_differences == []  # the same folder: pairable
    s["fingerprint"]["eval.image_dir"] = "/elsewhere/images"
    c = write_eval(tmp_path / "c", s)
    with pytest.raises(NotPairedError, match="read from /data/images .A. and /elsewhere/images .B., and the answers "
                                             "record no image hashes"):
        compare(a, c, n_resamples=20)


def test_a_moved_output_folder_is_read_where_it_is_now(tmp_path):
    write_eval(tmp_path / "a", spec())
    shutil.move(tmp_path / "a", tmp_path / "moved")
    assert compare(tmp_path / "moved", tmp_path / "moved", n_resamples=20).metrics["chair_s"]["diff"] == 0


def test_file_names_agree_with_what_evaluate_writes():
    from minigpt4.eval import benchmark_runs, fingerprint, generate

    assert paired_runs.CHAIR_CAPTIONS == benchmark_runs.CHAIR_CAPTIONS
    assert paired_runs.FINGERPRINT_SUFFIX == fingerprint.SUFFIX
    assert paired_runs.IMAGE_HASH == generate.IMAGE_HASH
    assert benchmark_runs.pope_answers_name("random") == "pope_random_answers.jsonl"
