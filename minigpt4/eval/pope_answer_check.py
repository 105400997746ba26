"""Does a POPE answer row belong to the question it is matched to? (minigpt4/eval/pope.py's match_answers)

An answers file scored against the wrong question file (another split, another POPE version, answers written in
another order) matches by question_id, or by line, without complaint, and is scored against other questions' labels:
a 90 % model reads as 10 %. Many answer rows carry their own evidence: evaluate.py writes the question's "image" and
the full "prompt"; POPE/LLaVA answer files the "prompt" with the question; others a "question". Where a row carries
such a field, it must agree with the question it is matched to:
  * "image": the same image, as a file name in any folder or as the COCO number in any spelling ("42",
    "COCO_val2014_000000000042.jpg");
  * "question", or "text" beside an "answer" (without one, "text" is the answer itself): the same words, compared in
    lower case without punctuation, so the protocols' question cleaning (LAVIS blip_caption) does not matter;
  * "prompt": contains the question's words (the prompt template and any suffix around them).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from minigpt4.common.jsonfiles import DataFileError


def _words(text: str) -> str:
    """Lower-case words and digits only: a question compared this way survives the protocols' cleaning (LAVIS's
    blip_caption drops punctuation and case) and a prompt template around it."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def _image_number(name: str) -> str | None:
    """The COCO image number of a file name or id ("COCO_val2014_000000000042.jpg", "42" -> "42"), else None."""
    stem = os.path.splitext(os.path.basename(name))[0].rsplit("_", 1)[-1]
    return str(int(stem)) if stem.isdigit() else None


def _same_image(stored: object, asked: object) -> bool:
    stored, asked = str(stored), str(asked)
    if stored == asked or os.path.basename(stored) == os.path.basename(asked):
        return True
    number = _image_number(stored)
    return number is not None and number == _image_number(asked)


def _question_fields(row: dict) -> list[tuple[str, str, str]]:
    """(field, its value, how it must relate to the question text) for each question-text field of an answer row:
    "question", "text" when the answer is under "answer" (else "text" is the answer), and "prompt" (contains it)."""
    fields = [("question", row.get("question"), "equal")]
    if "answer" in row:
        fields.append(("text", row.get("text"), "equal"))
    fields.append(("prompt", row.get("prompt"), "contain"))
    return [(name, value, how) for name, value, how in fields if isinstance(value, str)]


def check_answer_agrees(question: dict, row: dict, questions_path: str | Path, answers_path: str | Path,
                        line: int) -> None:
    """An answer row that names its image or repeats its question must name the image and question of the question
    it is matched to; otherwise it answers another question, and scoring it against this label is wrong."""
    where = f"{answers_path}:{line}: question_id {question['question_id']!r}"
    if "question_id" not in row:
        where += " (matched by line order)"
    if "image" in row and not _same_image(row["image"], question["image"]):
        raise DataFileError(f"{where}: the answer is about image {row['image']!r} but the question in "
                            f"{questions_path} is about image {question['image']!r}; the answers belong to other "
                            "questions (another question file or split?)")
    asked = question.get("text")
    if not isinstance(asked, str) or not _words(asked):
        return
    for name, value, how in _question_fields(row):
        stored, wanted = _words(value), _words(asked)
        if (how == "equal" and stored != wanted) or (how == "contain" and wanted not in stored):
            relation = "is not" if how == "equal" else "does not contain"
            raise DataFileError(f"{where}: the answer's {name} {value!r} {relation} the question in {questions_path}, "
                                f"{asked!r}; the answers belong to other questions (another question file or split?)")
