"""POPE scorer: answer -> label rules, metrics by hand, answer matching, errors, command line."""

import json
from pathlib import Path

import pytest

from minigpt4.eval.pope import (
    METRICS,
    answer_to_label,
    load_jsonl,
    main,
    pope_metrics,
    score_pope,
)

# answer, label under rule "reference", label under rule "first-sentence"
ANSWER_TABLE = [
    ("Yes, there is a dog in the image.", "yes", "yes"),
    ("No.", "no", "no"),
    ("There is no dog", "no", "no"),
    # "don't" ends with "n't": only the reference rule reads it as a no.
    ("I don't see one", "no", "yes"),
    # The special token is removed before splitting, so the piece is "No".
    ("<s>No", "no", "no"),
    ("</s> No, there is not.", "no", "no"),
    # Text after the end string is the model's next turn, not its answer.
    ("Yes###Human: no", "yes", "yes"),
    ("", "yes", "yes"),
    ("not sure", "no", "no"),
    # Upper-case NO is only in the reference rule's list.
    ("NO", "no", "yes"),
    # first-sentence reads only the text before the first ".", so the "no" of the second
    # sentence counts under the reference rule alone.
    ("Yes. But no dog.", "no", "yes"),
    # A comma glued to the word is deleted by both rules.
    ("No, it is a cat", "no", "no"),
    # Surrounding whitespace (a newline after the answer) is stripped first.
    ("No\n", "no", "no"),
    # Pieces must match exactly: "Nope" and "nothing" are not negations.
    ("Nope", "yes", "yes"),
    ("nothing like that", "yes", "yes"),
]


@pytest.mark.parametrize("answer,reference,first_sentence", ANSWER_TABLE)
def test_answer_to_label_both_rules(answer, reference, first_sentence):
    assert answer_to_label(answer, "reference") == reference
    assert answer_to_label(answer, "first-sentence") == first_sentence


def test_custom_end_string_and_unknown_rule():
    assert answer_to_label("Yes</s>USER: No", end_string="USER:") == "yes"
    # An empty end string cuts nothing: the piece "no" after "###" is read.
    assert answer_to_label("Yes### no", end_string="") == "no"
    assert answer_to_label("Yes### no") == "yes"
    with pytest.raises(ValueError, match="unknown POPE rule"):
        answer_to_label("yes", rule="majority")


def test_metrics_counted_by_hand():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "no", "no"]
    preds = ["yes", "yes", "yes", "no", "yes", "yes", "no", "no", "no", "no"]
    # TP = 3 (rows 0-2), FN = 1 (row 3), FP = 2 (rows 4-5), TN = 4 (rows 6-9)
    # accuracy  = (3 + 4) / 10 = 0.7
    # precision = 3 / (3 + 2) = 0.6
    # recall    = 3 / (3 + 1) = 0.75
    # F1        = 2 * 0.6 * 0.75 / (0.6 + 0.75) = 0.9 / 1.35 = 2/3
    # yes_ratio = (3 + 2) / 10 = 0.5
    metrics = pope_metrics(labels, preds)
    assert (metrics["tp"], metrics["fn"], metrics["fp"], metrics["tn"]) == (3, 1, 2, 4)
    assert metrics["n"] == 10
    assert metrics["accuracy"] == pytest.approx(0.7)
    assert metrics["precision"] == pytest.approx(0.6)
    assert metrics["recall"] == pytest.approx(0.75)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["yes_ratio"] == pytest.approx(0.5)


def test_no_yes_predictions_give_zero_precision_not_nan():
    # TP = 0, FP = 0: precision 0/0 is defined as 0.0; recall 0/2 = 0; F1 0.
    metrics = pope_metrics(["yes", "yes", "no"], ["no", "no", "no"])
    assert metrics["precision"] == 0.0
    assert metrics["recall"] == 0.0
    assert metrics["f1"] == 0.0
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["yes_ratio"] == 0.0


# ---------------------------------------------------------------------------------------------
# Files


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def question(question_id: int, image: int, thing: str, label: str) -> dict:
    return {"question_id": question_id, "image": f"COCO_val2014_{image:012d}.jpg",
            "text": f"Is there a {thing} in the image?", "label": label}


QUESTIONS = [
    question(1, 1, "dog", "yes"),
    question(2, 1, "cat", "no"),
    question(3, 2, "car", "yes"),
    question(4, 2, "bus", "no"),
]
# In question order: yes (TP), "Yes..." (FP), "<s>No" (FN), "I don't think so" (TN under reference).
ANSWER_TEXTS = ["Yes, there is.", "Yes, a cat.", "<s>No", "I don't think so"]


def test_answers_matched_by_id_in_any_order_and_by_line_order(tmp_path):
    questions = write_jsonl(tmp_path / "random.jsonl", QUESTIONS)
    # Reversed order, and the "text" key of POPE/LLaVA answer files.
    rows = [{"question_id": q["question_id"], "text": a} for q, a in zip(QUESTIONS, ANSWER_TEXTS)]
    by_id = write_jsonl(tmp_path / "by_id.jsonl", rows[::-1])
    by_order = write_jsonl(tmp_path / "by_order.jsonl", [{"answer": a} for a in ANSWER_TEXTS])
    for answers in (by_id, by_order):
        result = score_pope([questions], [answers])
        # TP 1, FP 1, FN 1, TN 1: accuracy 2/4, precision 1/2, recall 1/2, yes_ratio 2/4
        assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (1, 1, 1, 1)
        assert result["accuracy"] == 0.5 and result["precision"] == 0.5
        assert result["split"] == "random" and result["rule"] == "reference"


def test_malformed_line_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question_id": 1, "answer": "yes"}\n\n{"question_id": 2, "answer": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        load_jsonl(path)
    path.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: expected a JSON object"):
        load_jsonl(path)


def yes_answers(*question_ids: int, key: str = "answer") -> list[dict]:
    return [{"question_id": i, key: "yes"} for i in question_ids]


@pytest.mark.parametrize(
    "answers,message",
    [
        (yes_answers(1, 2, 3), r"no answer for 1 question.*\[4\]"),
        (yes_answers(1, 2, 3, 4, 9), r"answers\.jsonl:5: question_id 9 is not in"),
        (yes_answers(1, 2, 2, 3, 4), r"answers\.jsonl:3: duplicate answer .*first on line 2"),
        ([{"answer": "yes"}] * 3, "3 answers without question_id but .* has 4 questions"),
        (yes_answers(1) + [{"answer": "no"}], r"answers\.jsonl:2: answer has no question_id"),
        (yes_answers(1, 2, 3, 4, key="reply"), r"answers\.jsonl:1: .*neither 'answer' nor 'text'"),
    ],
)
def test_answer_file_errors_name_file_and_line(tmp_path, answers, message):
    questions = write_jsonl(tmp_path / "random.jsonl", QUESTIONS)
    answers_path = write_jsonl(tmp_path / "answers.jsonl", answers)
    with pytest.raises(ValueError, match=message):
        score_pope([questions], [answers_path])


def test_duplicate_question_id_and_bad_label(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", QUESTIONS + [QUESTIONS[0]])
    with pytest.raises(ValueError, match=r"q\.jsonl:5: duplicate question_id 1"):
        score_pope([questions], [write_jsonl(tmp_path / "a.jsonl", [])])
    bad = dict(QUESTIONS[0], label="maybe")
    questions = write_jsonl(tmp_path / "q.jsonl", [bad])
    with pytest.raises(ValueError, match=r"q\.jsonl:1: label must be 'yes' or 'no'"):
        score_pope([questions], [write_jsonl(tmp_path / "a.jsonl", [])])


def test_cli_several_splits_with_bootstrap(tmp_path, capsys):
    q_random = write_jsonl(tmp_path / "random.jsonl", QUESTIONS)
    q_popular = write_jsonl(tmp_path / "popular.jsonl", QUESTIONS)
    rows = [{"question_id": q["question_id"], "answer": a} for q, a in zip(QUESTIONS, ANSWER_TEXTS)]
    a_random = write_jsonl(tmp_path / "a1.jsonl", rows)
    # All answers right on "popular": accuracy 1.
    a_popular = write_jsonl(tmp_path / "a2.jsonl", [{"answer": q["label"]} for q in QUESTIONS])
    out = tmp_path / "out" / "pope.json"
    code = main(["--questions", str(q_random), str(q_popular), "--answers", str(a_random),
                 str(a_popular), "--out", str(out), "--bootstrap", "50", "--seed", "3"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "pope" and result["rule"] == "reference"
    assert result["end_string"] == "###"
    assert set(result["splits"]) == {"random", "popular"}
    assert result["splits"]["random"]["accuracy"] == 0.5
    assert result["splits"]["popular"]["accuracy"] == 1.0
    # mean over splits: (0.5 + 1.0) / 2
    assert result["mean"]["accuracy"] == pytest.approx(0.75)
    for block in (result["splits"]["random"], result["splits"]["popular"], result["mean"]):
        assert set(block["bootstrap"]["ci"]) == set(METRICS)
    files = result["files"]["questions"] + result["files"]["answers"]
    assert all(len(f["sha256"]) == 64 for f in files)
    printed = capsys.readouterr().out
    assert "random" in printed and "mean" in printed and "±" in printed


def test_cli_first_sentence_rule_single_file(tmp_path):
    questions = write_jsonl(tmp_path / "adversarial.jsonl", QUESTIONS)
    answers = write_jsonl(tmp_path / "a.jsonl", [{"answer": a} for a in ANSWER_TEXTS])
    out = tmp_path / "pope.json"
    assert main(["--questions", str(questions), "--answers", str(answers), "--rule",
                 "first-sentence", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # "I don't think so" is a yes under first-sentence: TP 1, FP 2, FN 1, TN 0.
    assert result["rule"] == "first-sentence" and result["split"] == "adversarial"
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (1, 2, 1, 0)
    assert "bootstrap" not in result and "splits" not in result


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    questions = write_jsonl(tmp_path / "random.jsonl", QUESTIONS)
    answers = write_jsonl(tmp_path / "a.jsonl", [{"answer": "yes"}])
    assert main(["--questions", str(questions), "--answers", str(answers)]) == 2
    assert "matched by line order" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Answers keyed to the wrong questions (issue 22): an answer row's own image / question fields must agree


def with_fields(**fields) -> list[dict]:
    """One "yes" answer per question, each carrying the question's own fields as evaluate.py writes them."""
    return [{"question_id": q["question_id"], "image": q["image"], "answer": "yes",
             "prompt": f"###Human: <Img><ImageHere></Img> {q['text']} ###Assistant: ", **fields} for q in QUESTIONS]


@pytest.mark.parametrize(
    "change,message",
    [
        # question 3's answer is about image 1 (another split's question 3, say)
        (lambda rows: rows[2].update(image="COCO_val2014_000000000001.jpg"),
         r"answers\.jsonl:3: question_id 3: the answer is about image 'COCO_val2014_000000000001\.jpg' but the "
         r"question in .*random\.jsonl is about image 'COCO_val2014_000000000002\.jpg'"),
        (lambda rows: rows[1].update(prompt="###Human: <Img><ImageHere></Img> Is there a dog in the image? ###"),
         r"answers\.jsonl:2: question_id 2: the answer's prompt .*dog.* does not contain the question .*"
         r"'Is there a cat in the image\?'"),
        (lambda rows: rows[3].update(question="Is there a train in the image?"),
         r"answers\.jsonl:4: question_id 4: the answer's question 'Is there a train in the image\?' is not the "
         r"question .*'Is there a bus in the image\?'"),
        (lambda rows: rows[0].update(text="Is there a sofa in the image?"),  # beside "answer", "text" is the question
         r"answers\.jsonl:1: question_id 1: the answer's text 'Is there a sofa in the image\?' is not"),
    ],
)
def test_answers_contradicting_their_question_are_refused(tmp_path, change, message):
    questions = write_jsonl(tmp_path / "random.jsonl", QUESTIONS)
    rows = with_fields()
    change(rows)
    with pytest.raises(ValueError, match=message):
        score_pope([questions], [write_jsonl(tmp_path / "answers.jsonl", rows)])


def test_answers_of_another_split_by_line_order_are_refused(tmp_path, capsys):
    """Line-order answers (no question_id) of shuffled questions: each line names another question's image."""
    questions = write_jsonl(tmp_path / "random.jsonl", QUESTIONS)
    shuffled = [QUESTIONS[i] for i in (2, 3, 0, 1)]
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"image": q["image"], "answer": q["label"]} for q in shuffled])
    assert main(["--questions", str(questions), "--answers", str(answers)]) == 2
    err = capsys.readouterr().err
    assert "answers.jsonl:1: question_id 1 (matched by line order): the answer is about image" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_answers_naming_their_question_in_other_forms_are_scored(tmp_path):
    """The same image as a bare id or a path, the question cleaned (blip_caption) or inside a longer prompt."""
    questions = write_jsonl(tmp_path / "random.jsonl", QUESTIONS)
    rows = with_fields()
    rows[0]["image"] = 1
    rows[1]["image"] = "/data/coco/val2014/COCO_val2014_000000000001.jpg"
    rows[2]["question"] = "is there a car in the image"
    rows[3]["prompt"] = "USER: <image>\nIs there a bus in the image?\nAnswer with one word. ASSISTANT:"
    result = score_pope([questions], [write_jsonl(tmp_path / "answers.jsonl", rows)])
    assert result["n"] == 4 and result["yes_ratio"] == 1.0
