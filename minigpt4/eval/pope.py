"""POPE scorer: answers to yes/no object questions -> accuracy, precision, recall, F1, yes-ratio.

    python -m minigpt4.eval.pope --questions random.jsonl popular.jsonl adversarial.jsonl \
        --answers random_ans.jsonl popular_ans.jsonl adversarial_ans.jsonl \
        [--rule reference|first-sentence] [--end-string '###'] [--out pope.json] \
        [--bootstrap 1000 --seed 0]

Inputs. A questions file has one JSON object per line: {"question_id", "image", "text", "label"}
with label "yes" or "no". The i-th answers file belongs to the i-th questions file; its lines carry
the answer text under "answer" (or "text", as POPE/LLaVA answer files do) and, normally, the
"question_id" they answer. Answer lines without any "question_id" are matched to questions by line
order. Missing, extra or duplicate answers are errors that name the file and line. An answer line that names its
image ("image") or repeats its question ("question", "prompt", or "text" beside an "answer") must agree with the
question it is matched to (the same image, in any of its forms; the same words): answers of another question file
would otherwise be scored against the wrong labels.

Answer -> label (every result names its rule):
  1. delete the special tokens "<s>", "</s>", "<unk>", "<pad>" (text decoded with special tokens
     kept would otherwise read "<s>No" as one piece, which is not "No");
  2. cut at the first end string ("###", the conversation template's separator) so a generated
     next turn ("Yes###Human: no ...") is not read;
  3. strip surrounding whitespace (as the reference generation code does to its decoded text);
  4. rule "reference" (AdaVIB, OPERA): delete every "." and ",", split on single spaces, "no" if a
     piece is exactly one of No, no, not, NO or ends with "n't", else "yes";
     rule "first-sentence" (the POPE authors' script): keep the text before the first "." if
     there is one, delete ",", split on single spaces, "no" if a piece is exactly No, not or no,
     else "yes".

Metrics treat "yes" as the positive class. All are fractions in [0, 1]. An undefined ratio is
0.0 (not NaN): precision with no "yes" prediction, recall with no "yes" label, F1 when
precision + recall is 0.

Output JSON (--out). With one questions file the metrics sit at the top level; with several they
sit under "splits" (keyed by the questions file's stem, e.g. "random") and their unweighted mean
under "mean":
    {"benchmark": "pope", "rule": "reference", "end_string": "###",
     "files": {"questions": [{"path", "sha256"}], "answers": [{"path", "sha256"}]},
     "split": "random", "n": 2910, "accuracy": .., "precision": .., "recall": .., "f1": ..,
     "yes_ratio": .., "tp": .., "fp": .., "tn": .., "fn": ..,
     "bootstrap": {"unit": "image", "method": "percentile", "n_resamples": 1000, "seed": 0,
                   "level": 0.95, "ci": {"accuracy": [low, high], ...}, "std": {...}}}
Each split also records "n_images" and "question_set_id" (metrics_file.item_set_id of its question ids and
images); the top level records "n_questions", "n_images" and "question_set_id" over every split (split name,
question id, image), which the results table shows so that runs on different question sets are told apart.
"bootstrap" is present when --bootstrap N > 0. The mean's interval resamples images jointly across
splits (POPE's splits share their images), recomputing every split's metrics and their mean.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from minigpt4.common.files import sha256_file
from minigpt4.common.jsonfiles import DataFileError, read_jsonl
from minigpt4.eval.bootstrap import bootstrap_ci, bootstrap_summary, safe_divide
from minigpt4.eval.metrics_file import item_set_id, print_and_write
from minigpt4.eval.pope_answer_check import check_answer_agrees

RULES = ("reference", "first-sentence")
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<pad>")
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")
# Words that make an answer "no", per rule (exact matches after splitting on single spaces).
NEGATIONS = {
    "reference": frozenset({"No", "no", "not", "NO"}),
    "first-sentence": frozenset({"No", "not", "no"}),
}


# ---------------------------------------------------------------------------------------------
# Reading files


def _read_jsonl_numbered(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a malformed line is an error naming it."""
    rows = read_jsonl(path)
    for line_number, obj in rows:
        if not isinstance(obj, dict):
            raise DataFileError(f"{path}:{line_number}: expected a JSON object, got {type(obj).__name__}")
    return rows


def load_jsonl(path: str | Path) -> list[dict]:
    """All objects of a JSON-lines file; blank lines skipped, malformed lines named by number."""
    return [obj for _, obj in _read_jsonl_numbered(path)]


def _file_record(path: str | Path) -> dict[str, str]:
    return {"path": str(path), "sha256": sha256_file(path)}


def _is_id(value: object) -> bool:
    """An integer or a non-empty string: what a question id or a COCO image name can be."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and bool(value.strip()))


def load_questions(path: str | Path, require_text: bool = False) -> list[dict]:
    """Validated question rows: question_id (unique), image and label ("yes"/"no") required, and the
    question "text" (a non-empty string) when `require_text` (generation needs it, scoring does not)."""
    questions: list[dict] = []
    seen: dict[str, int] = {}
    required = ("question_id", "image", "label") + (("text",) if require_text else ())
    for line_number, row in _read_jsonl_numbered(path):
        for key in required:
            if key not in row:
                raise DataFileError(f"{path}:{line_number}: question has no {key!r} key")
        for key in ("question_id", "image"):
            # null, 1.0, true or a list would still "work" through str() and then never match its answer
            # (or, for images, resolve to a file named "None"): refuse them here, by line.
            if not _is_id(row[key]):
                raise DataFileError(f"{path}:{line_number}: {key} must be an integer or a non-empty string, "
                                    f"got {row[key]!r}")
        if require_text and not (isinstance(row["text"], str) and row["text"].strip()):
            raise DataFileError(f"{path}:{line_number}: text must be the question as a non-empty string, "
                                f"got {row['text']!r}")
        label = str(row["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise DataFileError(
                f"{path}:{line_number}: label must be 'yes' or 'no', got {row['label']!r}"
            )
        key = str(row["question_id"])
        if key in seen:
            raise DataFileError(
                f"{path}:{line_number}: duplicate question_id {row['question_id']!r} "
                f"(first on line {seen[key]})"
            )
        seen[key] = line_number
        questions.append({**row, "label": label})
    if not questions:
        raise DataFileError(f"{path}: no questions")
    return questions


def _answer_text(row: dict, path: str | Path, line_number: int) -> str:
    text = row.get("answer", row.get("text"))
    if text is None:
        raise DataFileError(f"{path}:{line_number}: answer line has neither 'answer' nor 'text'")
    if not isinstance(text, str):
        raise DataFileError(f"{path}:{line_number}: answer must be a string, got {text!r}")
    return text


def _rows_in_question_order(
    questions: list[dict], questions_path: str | Path, answers_path: str | Path
) -> list[tuple[int, dict]]:
    """(line number, answer row) for each question, in question order: by question_id, or by line order when no
    answer line has one."""
    rows = _read_jsonl_numbered(answers_path)
    with_id = [line for line, row in rows if "question_id" in row]
    if not with_id:
        # No ids at all: the answers were written in question order.
        if len(rows) != len(questions):
            raise DataFileError(
                f"{answers_path}: {len(rows)} answers without question_id but {questions_path} "
                f"has {len(questions)} questions; such answers are matched by line order"
            )
        return rows
    if len(with_id) != len(rows):
        first_missing = next(line for line, row in rows if "question_id" not in row)
        raise DataFileError(
            f"{answers_path}:{first_missing}: answer has no question_id while other lines do"
        )
    question_ids = {str(q["question_id"]) for q in questions}
    by_id: dict[str, tuple[int, dict]] = {}
    for line, row in rows:
        key = str(row["question_id"])
        if key in by_id:
            raise DataFileError(
                f"{answers_path}:{line}: duplicate answer for question_id {row['question_id']!r} "
                f"(first on line {by_id[key][0]})"
            )
        if key not in question_ids:
            raise DataFileError(
                f"{answers_path}:{line}: question_id {row['question_id']!r} is not in "
                f"{questions_path}"
            )
        by_id[key] = (line, row)
    missing = [q["question_id"] for q in questions if str(q["question_id"]) not in by_id]
    if missing:
        raise DataFileError(
            f"{answers_path}: no answer for {len(missing)} question(s) of {questions_path}, "
            f"e.g. question_id {missing[:5]}"
        )
    return [by_id[str(q["question_id"])] for q in questions]


def match_answers(
    questions: list[dict], questions_path: str | Path, answers_path: str | Path
) -> list[str]:
    """The answer text for each question, in question order. An answer row's own "image", "question", "prompt"
    (and "text" beside an "answer") must agree with the question it is matched to (`check_answer_agrees`)."""
    matched = _rows_in_question_order(questions, questions_path, answers_path)
    for question, (line, row) in zip(questions, matched):
        check_answer_agrees(question, row, questions_path, answers_path, line)
    return [_answer_text(row, answers_path, line) for line, row in matched]


# ---------------------------------------------------------------------------------------------
# Answer -> label


def answer_to_label(answer: str, rule: str = "reference", end_string: str = "###") -> str:
    """'yes' or 'no' for one generated answer under `rule` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"unknown POPE rule {rule!r}; expected one of {list(RULES)}")
    text = answer
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "")
    if end_string:
        text = text.split(end_string, 1)[0]
    text = text.strip()
    negations = NEGATIONS[rule]
    if rule == "reference":
        pieces = text.replace(".", "").replace(",", "").split(" ")
        is_no = any(p in negations or p.endswith("n't") for p in pieces)
    else:
        pieces = text.split(".", 1)[0].replace(",", "").split(" ")
        is_no = any(p in negations for p in pieces)
    return "no" if is_no else "yes"


# ---------------------------------------------------------------------------------------------
# Metrics


def metrics_from_counts(tp, fp, tn, fn) -> dict:
    """Metrics from confusion counts; scalars or arrays (one entry per bootstrap resample)."""
    tp, fp, tn, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, tn, fn))
    precision = safe_divide(tp, tp + fp)
    recall = safe_divide(tp, tp + fn)
    return {
        "accuracy": safe_divide(tp + tn, tp + fp + tn + fn),
        "precision": precision,
        "recall": recall,
        "f1": safe_divide(2 * precision * recall, precision + recall),
        "yes_ratio": safe_divide(tp + fp, tp + fp + tn + fn),
    }


# (label, prediction) -> column of the one-hot confusion rows: tp, fp, tn, fn.
_CONFUSION_COLUMN = {("yes", "yes"): 0, ("no", "yes"): 1, ("no", "no"): 2, ("yes", "no"): 3}


def _confusion_rows(labels: Sequence[str], preds: Sequence[str]) -> np.ndarray:
    """[n, 4] one-hot rows over (tp, fp, tn, fn)."""
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    rows = np.zeros((len(labels), 4), dtype=np.float64)
    for i, (label, pred) in enumerate(zip(labels, preds)):
        if label not in ("yes", "no") or pred not in ("yes", "no"):
            raise ValueError(
                f"row {i}: labels and predictions must be 'yes'/'no', got {label!r}, {pred!r}"
            )
        rows[i, _CONFUSION_COLUMN[(label, pred)]] = 1.0
    return rows


def pope_metrics(labels: list[str], preds: list[str]) -> dict:
    """accuracy, precision, recall, f1, yes_ratio (floats) plus n, tp, fp, tn, fn (ints)."""
    tp, fp, tn, fn = (int(x) for x in _confusion_rows(labels, preds).sum(axis=0))
    metrics = {name: float(value) for name, value in metrics_from_counts(tp, fp, tn, fn).items()}
    return {"n": len(labels), **metrics, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


# ---------------------------------------------------------------------------------------------
# Scoring files


def _split_metrics_statistic(split_index: int):
    """Statistic over totals whose columns 4k..4k+3 are split k's (tp, fp, tn, fn)."""

    def statistic(totals: np.ndarray) -> dict:
        tp, fp, tn, fn = (totals[..., 4 * split_index + c] for c in range(4))
        return metrics_from_counts(tp, fp, tn, fn)

    return statistic


def _mean_metrics_statistic(n_splits: int):
    def statistic(totals: np.ndarray) -> dict:
        per_split = [_split_metrics_statistic(k)(totals) for k in range(n_splits)]
        return {name: np.mean([m[name] for m in per_split], axis=0) for name in METRICS}

    return statistic


def score_pope(
    question_files: Sequence[str | Path],
    answer_files: Sequence[str | Path],
    rule: str = "reference",
    end_string: str = "###",
    n_bootstrap: int = 0,
    seed: int = 0,
) -> dict:
    """Score answer files against question files (paired by position); see the module docstring."""
    if rule not in RULES:
        raise ValueError(f"unknown POPE rule {rule!r}; expected one of {list(RULES)}")
    if len(question_files) != len(answer_files) or not question_files:
        raise ValueError(
            f"need one answers file per questions file, got {len(question_files)} questions "
            f"file(s) and {len(answer_files)} answers file(s)"
        )
    names = [Path(p).stem for p in question_files]
    if len(set(names)) != len(names):
        raise ValueError(f"questions files must have distinct names (split names): {names}")

    splits: dict[str, dict] = {}
    joint_rows, joint_units = [], []
    scored_items: list[str] = []  # split, question id and image of every scored question: the question set
    for k, (q_path, a_path) in enumerate(zip(question_files, answer_files)):
        questions = load_questions(q_path)
        answers = match_answers(questions, q_path, a_path)
        labels = [q["label"] for q in questions]
        preds = [answer_to_label(a, rule, end_string) for a in answers]
        result = {"split": names[k], **pope_metrics(labels, preds)}
        images = [str(q["image"]) for q in questions]
        result["n_images"] = len(set(images))
        result["question_set_id"] = item_set_id(f"{q['question_id']}\t{q['image']}" for q in questions)
        scored_items += [f"{names[k]}\t{q['question_id']}\t{q['image']}" for q in questions]
        confusion = _confusion_rows(labels, preds)
        if n_bootstrap > 0:
            intervals = bootstrap_ci(
                confusion, images, _split_metrics_statistic(0), n_bootstrap, seed
            )
            result["bootstrap"] = bootstrap_summary(intervals, n_bootstrap, seed)
        splits[names[k]] = result
        # For the mean: split k's counts go in columns 4k..4k+3, zeros elsewhere.
        padded = np.zeros((len(questions), 4 * len(names)))
        padded[:, 4 * k : 4 * k + 4] = confusion
        joint_rows.append(padded)
        joint_units.extend(images)

    output: dict = {
        "benchmark": "pope",
        "rule": rule,
        "end_string": end_string,
        "files": {
            "questions": [_file_record(p) for p in question_files],
            "answers": [_file_record(p) for p in answer_files],
        },
    }
    if len(names) == 1:
        output.update(splits[names[0]])
    output.update(n_questions=len(scored_items), n_images=len(set(joint_units)),
                  question_set_id=item_set_id(scored_items))
    if len(names) == 1:
        return output
    mean: dict = {name: float(np.mean([s[name] for s in splits.values()])) for name in METRICS}
    if n_bootstrap > 0:
        intervals = bootstrap_ci(
            np.concatenate(joint_rows), joint_units, _mean_metrics_statistic(len(names)),
            n_bootstrap, seed,
        )
        mean["bootstrap"] = bootstrap_summary(intervals, n_bootstrap, seed)
    output["splits"] = splits
    output["mean"] = mean
    return output


# ---------------------------------------------------------------------------------------------
# Command line


def answered_rows(result: dict, locate=lambda path: path):
    """(split, question row, answer row, predicted label) for every question of a score_pope result, read back from
    the question and answer files it names (`locate` maps a recorded path to where the file is now)."""
    for q_file, a_file in zip(result["files"]["questions"], result["files"]["answers"], strict=True):
        q_path, a_path = locate(q_file["path"]), locate(a_file["path"])
        questions = load_questions(q_path)
        matched = _rows_in_question_order(questions, q_path, a_path)
        for question, (line, row) in zip(questions, matched, strict=True):
            check_answer_agrees(question, row, q_path, a_path, line)
            predicted = answer_to_label(_answer_text(row, a_path, line), result["rule"], result["end_string"])
            yield Path(q_file["path"]).stem, question, row, predicted


def answered_questions(result: dict):
    """(split, question row, predicted label) for every question of a score_pope result (see `answered_rows`)."""
    for split, question, _, predicted in answered_rows(result):
        yield split, question, predicted


def format_table(result: dict) -> str:
    """A small plain-text table, percentages with one decimal and ± half the 95% interval."""
    rows = result["splits"] if "splits" in result else {result["split"]: result}
    if "mean" in result:
        rows = {**rows, "mean": result["mean"]}
    header = f"{'split':<14}{'n':>6}" + "".join(f"{m:>16}" for m in METRICS)
    lines = [f"POPE, rule '{result['rule']}', end string {result['end_string']!r}", header]
    for name, metrics in rows.items():
        ci = metrics.get("bootstrap", {}).get("ci", {})
        cells = []
        for m in METRICS:
            cell = f"{100 * metrics[m]:.1f}"
            if m in ci:
                cell += f" ± {100 * (ci[m][1] - ci[m][0]) / 2:.1f}"
            cells.append(f"{cell:>16}")
        n = str(metrics.get("n", ""))
        lines.append(f"{name:<14}{n:>6}" + "".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", nargs="+", required=True, help="POPE questions JSONL")
    parser.add_argument(
        "--answers", nargs="+", required=True, help="answers JSONL, one per questions file"
    )
    parser.add_argument("--rule", choices=RULES, default="reference")
    parser.add_argument(
        "--end-string", default="###", help="answers are cut at its first occurrence"
    )
    parser.add_argument("--out", help="write the result JSON here")
    parser.add_argument(
        "--bootstrap", type=int, default=0, metavar="N", help="image-level resamples for 95%% CIs"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = score_pope(
            args.questions, args.answers, rule=args.rule, end_string=args.end_string,
            n_bootstrap=args.bootstrap, seed=args.seed,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return print_and_write(result, format_table(result), args.out)


if __name__ == "__main__":
    sys.exit(main())
