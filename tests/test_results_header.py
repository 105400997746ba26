"""The header line of generated results files (date, machine, commit) and --publish, which copies a results file
under docs/results/: the benchmark's and the full-size check's Markdown start with the header, the copy is the file,
and a destination that is not a Markdown file is refused before anything runs."""
from __future__ import annotations

import datetime
import json
import re

import pytest
from _scripts import load_script

from minigpt4.common import results_header as header_module
from minigpt4.common.results_header import check_publish_path, publish, results_header

NOW = datetime.datetime(2026, 12, 7, 5, 9, tzinfo=datetime.timezone.utc)
HEADER = re.compile(r"^Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC on .+ \(\d+ cores, \d+ torch threads?; load average "
                    r"[\d.]+ [\d.]+ [\d.]+ before, [\d.]+ [\d.]+ [\d.]+ after\), commit (\w{12}|unknown).*\.$")


def test_header_names_date_machine_load_and_commit(monkeypatch):
    monkeypatch.setattr(header_module, "git_state", lambda: {"commit": "0123456789abcdef" * 2, "dirty": False,
                                                             "changed_files": 0})
    monkeypatch.setattr(header_module, "cpu_model", lambda: "Test CPU 9000")
    line = results_header([1.5, 2.25, 3.0], now=NOW)
    assert line.startswith("Generated 2026-12-07 05:09 UTC on Test CPU 9000 (")
    assert "load average 1.50 2.25 3.00 before, " in line and line.endswith(", commit 0123456789ab.")
    assert HEADER.match(line), line
    monkeypatch.setattr(header_module, "git_state", lambda: {"commit": "f" * 40, "dirty": True, "changed_files": 3})
    assert results_header([0, 0, 0], now=NOW).endswith("commit ffffffffffff with uncommitted changes to 3 tracked "
                                                       "files.")
    assert " on Some GPU (" in results_header([0, 0, 0], gpu="Some GPU", now=NOW)
    monkeypatch.setattr(header_module, "git_state", lambda: {"commit": None, "dirty": None,
                                                             "reason": "git is not installed"})
    assert results_header([0, 0, 0], now=NOW).endswith("commit unknown (git is not installed).")


def test_header_of_this_checkout_matches_the_pattern():
    assert HEADER.match(results_header([0.5, 0.25, 0.125]))


def test_publish_copies_the_file_and_refuses_other_names(tmp_path):
    source = tmp_path / "out" / "results.md"
    source.parent.mkdir()
    source.write_text("Generated ...\n\n| a | b |\n", encoding="utf-8")
    copied = publish(source, tmp_path / "docs" / "results" / "run.md")
    assert copied.read_bytes() == source.read_bytes()
    assert [p.name for p in copied.parent.iterdir()] == ["run.md"]  # no partial file left behind
    for bad in (tmp_path / "docs" / "results" / "run.json", tmp_path / "docs" / "results"):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}: expected a Markdown file name ending in \.md"):
            publish(source, bad)
    with pytest.raises(ValueError, match="ending in .md"):
        check_publish_path("docs/results/")


@pytest.mark.parametrize("script, argv", [
    ("benchmark", ["--out", "x.json"]),
    ("fullsize_check", ["--out", "x.json", "--size", "tiny"]),
    ("shapes_experiment", []),
])
def test_scripts_refuse_a_publish_path_before_running(script, argv, capsys):
    with pytest.raises(SystemExit) as info:
        load_script(script).parse_args([*argv, "--publish", "docs/results/table.txt"])
    assert info.value.code == 2
    assert "expected a Markdown file name ending in .md" in capsys.readouterr().err


def test_benchmark_markdown_starts_with_the_header():
    from minigpt4.benchmarking.measure import Report
    from minigpt4.benchmarking.speed_run import markdown

    meta = {"device_name": "x86_64", "device": "cpu", "cpu_cores": 2, "load_average_before": [1.0, 1.0, 1.0],
            "load_average_after": [1.0, 1.0, 1.0], "size": "tiny", "gpu_measured": False, "mfu_formula": "MFU"}
    lines = markdown({"meta": meta, "targets": {}}, Report(False)).splitlines()
    assert HEADER.match(lines[0]), lines[0]
    assert lines[1] == "" and lines[2].startswith("Benchmark on x86_64 (cpu, 2 CPU cores")


def test_fullsize_tiny_writes_the_header_and_publishes(tmp_path):
    import torch

    threads = torch.get_num_threads()
    out, published = tmp_path / "fullsize.json", tmp_path / "docs" / "results" / "fullsize_tiny.md"
    try:
        load_script("fullsize_check").main(["--size", "tiny", "--threads", "1", "--no-profile", "--out", str(out),
                                            "--workdir", str(tmp_path / "work"), "--publish", str(published)])
    finally:
        torch.set_num_threads(threads)
    markdown = out.with_suffix(".md").read_text(encoding="utf-8")
    first, blank, table = markdown.split("\n", 2)
    assert HEADER.match(first) and "1 torch thread;" in first and blank == ""
    assert table.startswith("Full-size check: minigpt4 tiny") and table == json.loads(out.read_text())["table"] + "\n"
    assert published.read_text(encoding="utf-8") == markdown
