"""scripts/results_table.py: metrics.json files -> one Markdown table."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_table.py"


def load_script():
    spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


results_table_module = load_script()

BASELINE = {
    "model": "minigpt4-7b",
    "projector": "linear",
    "protocol": "opera-500-512",
    "chair": {
        "chair_s": 0.318, "chair_i": 0.099, "recall": 0.6, "mean_length": 98.24,
        "bootstrap": {"ci": {"chair_s": [0.28, 0.36], "chair_i": [0.08, 0.12]}},
    },
    "pope": {
        "rule": "reference",
        "splits": {
            "random": {"accuracy": 0.85, "f1": 0.8512,
                       "bootstrap": {"ci": {"accuracy": [0.84, 0.86], "f1": [0.84, 0.862]}}},
            "popular": {"accuracy": 0.8, "f1": 0.79},
        },
        "mean": {"accuracy": 0.825, "f1": 0.8206},
    },
}
# Only POPE, one file: its split is named by "split"; no CHAIR numbers.
VIB_POPE_ONLY = {
    "model": "minigpt4-7b",
    "projector": "vib",
    "protocol": "pope-greedy",
    "pope": {"split": "adversarial", "accuracy": 0.8, "f1": 0.75},
}

EXPECTED = """\
| model | projector | protocol | source | CHAIR_S | CHAIR_I | recall | length | POPE random acc | POPE random F1 | POPE popular acc | POPE popular F1 | POPE adversarial acc | POPE adversarial F1 | POPE mean acc | POPE mean F1 |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| minigpt4-7b | linear | opera-500-512 | – | 31.8 ± 4.0 | 9.9 ± 2.0 | 60.0 | 98.2 | 85.0 ± 1.0 | 85.1 ± 1.1 | 80.0 | 79.0 | – | – | 82.5 | 82.1 |
| minigpt4-7b | vib | pope-greedy | – | – | – | – | – | – | – | – | – | 80.0 | 75.0 | – | – |
"""


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_two_files_make_the_expected_markdown(tmp_path):
    first = write(tmp_path / "base" / "metrics.json", BASELINE)
    second = write(tmp_path / "vib" / "metrics.json", VIB_POPE_ONLY)
    assert results_table_module.results_table([first, second]) == EXPECTED


def test_cli_writes_the_table(tmp_path, capsys):
    first = write(tmp_path / "base" / "metrics.json", BASELINE)
    second = write(tmp_path / "vib" / "metrics.json", VIB_POPE_ONLY)
    out = tmp_path / "table.md"
    assert results_table_module.main([str(first), str(second), "--out", str(out)]) == 0
    assert out.read_text() == EXPECTED
    assert capsys.readouterr().out == EXPECTED


@pytest.mark.parametrize(
    "data,message",
    [
        ({"projector": "vib", "protocol": "p", "pope": {}}, "has no .model."),
        ({"model": "m", "projector": "vib", "protocol": "p"}, "neither a 'chair' nor a 'pope'"),
    ],
)
def test_bad_metrics_files_are_named(tmp_path, data, message):
    path = write(tmp_path / "metrics.json", data)
    with pytest.raises(ValueError, match=message):
        results_table_module.results_table([path])


def test_repeated_configuration_is_an_error(tmp_path):
    first = write(tmp_path / "a" / "metrics.json", VIB_POPE_ONLY)
    second = write(tmp_path / "b" / "metrics.json", VIB_POPE_ONLY)
    with pytest.raises(ValueError, match="same model/projector/protocol"):
        results_table_module.results_table([first, second])
