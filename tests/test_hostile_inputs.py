"""One corpus of hostile inputs, one table: every row is an input a real run can meet and the answer it gets.

An answer is one of
  * Raises(type, fragments): a clear error whose message names the file / key / line and what was expected;
    the exception must be raised by this project's code (its last frame is in this repository), never a
    traceback from deep inside torch, PIL or json;
  * Exits2(fragments[, prefix]): `train.py` / `evaluate.py` `main([...])` returns 2 and prints one line,
    "config error: ..." naming the key before any model or output exists (or, with prefix "error: ", naming the
    data file or tokenizer that failed while the run was being set up), never a traceback;
  * Counted(n): the input is skipped because the config says skip, and the skip is counted (n);
  * Holds(description): the input is accepted and the result is right (checked by the row's own assertions).

Rows are grouped by area, one module each in tests/hostile/: images.py (dataset path with on_bad_image
error/skip, eval ImageLoader error/skip, a whole POPE/CHAIR run with skip, files that are not regular files),
json_files.py (JSON/JSONL files), configs.py, checkpoints.py, outputs.py (resume and output folders: damaged
checkpoints, full or read-only disks, a folder another run holds), captions.py, tokenizers.py; what they share,
and the check each row goes through, is tests/_hostile.py. This file runs them all, one test per row (one area:
`-k image/`, `-k checkpoint/`, ...). Crash safety
(SIGKILL / SIGTERM resume, failed checkpoint writes, resumable evaluation) lives in test_runner.py and
test_evaluate.py; odd-mode pixel values in test_datasets.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from _hostile import Case, Env, Shared, check_case
from hostile import CORPUS, EXPECTED_VALUES


@pytest.fixture(scope="module")
def shared(tiny_tokenizer_dir, tmp_path_factory) -> Shared:
    return Shared(tiny_tokenizer_dir, tmp_path_factory.mktemp("hostile_shared"))


def test_corpus_ids_are_unique():
    ids = [case.id for case in CORPUS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.parametrize("case", CORPUS, ids=[case.id for case in CORPUS])
def test_hostile_input(case: Case, shared: Shared, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # provenance / CHAIR caches stay inside the test
    check_case(case, Env(tmp_path, shared), capsys, EXPECTED_VALUES)
