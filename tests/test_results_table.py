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
        "chair_s": 0.318, "chair_i": 0.099, "recall": 0.6, "mean_length": 98.24, "n_images": 500,
        "image_set_id": "1a2b3c4d",
        "bootstrap": {"ci": {"chair_s": [0.28, 0.36], "chair_i": [0.08, 0.12]}},
    },
    "pope": {
        "rule": "reference", "n_questions": 6000, "n_images": 500, "question_set_id": "5e6f7a8b",
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

# (a metrics.json from before the set counts: its set cell is "–")
EXPECTED = (
    "| model | projector | protocol | source | CHAIR_S | CHAIR_I | recall | length | CHAIR set | POPE set "
    "| POPE random acc | POPE random F1 | POPE popular acc | POPE popular F1 | POPE adversarial acc "
    "| POPE adversarial F1 | POPE mean acc | POPE mean F1 |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    "| minigpt4-7b | linear | opera-500-512 | – | 31.8 ± 4.0 | 9.9 ± 2.0 | 60.0 | 98.2 | 500 img · 1a2b3c4d "
    "| 6000 q, 500 img · 5e6f7a8b | 85.0 ± 1.0 | 85.1 ± 1.1 | 80.0 | 79.0 | – | – | 82.5 | 82.1 |\n"
    "| minigpt4-7b | vib | pope-greedy | – | – | – | – | – | – | – | – | – | – | – | 80.0 | 75.0 | – | – |\n"
)


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


def test_a_crash_while_writing_the_table_keeps_the_old_one(tmp_path, monkeypatch):
    """--out is written beside and renamed into place (common/jsonfiles.write_text_atomic), so a crash mid-write
    leaves the previous table whole and no temporary file behind."""
    from minigpt4.common import jsonfiles

    first = write(tmp_path / "base" / "metrics.json", BASELINE)
    out = tmp_path / "table.md"
    out.write_text("the previous table\n")

    def crash(*_):
        raise OSError("disk gone mid-write")

    monkeypatch.setattr(jsonfiles.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        results_table_module.main([str(first), "--out", str(out)])
    assert out.read_text() == "the previous table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "table.md"]


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


def chair_run(projector: str, n_images: int, set_id: str, label: str = "shapes-chair") -> dict:
    """A CHAIR-only metrics.json of the named protocol shapes-chair (`label` says how it was run)."""
    return {"model": "m", "projector": projector, "protocol": label,
            "protocols": {"chair": {"name": "shapes-chair", "label": label}},
            "chair": {"chair_s": 0.25, "chair_i": 0.1, "recall": 0.9, "mean_length": 17.0, "n_images": n_images,
                      "image_set_id": set_id}}


def test_rows_of_one_protocol_on_different_image_sets_are_marked(tmp_path):
    """Issue 22: a 4-image and a 2-image run of the same protocol side by side; the table must tell them apart."""
    paths = [write(tmp_path / "a" / "metrics.json", chair_run("linear", 4, "aaaa1111")),
             write(tmp_path / "b" / "metrics.json", chair_run("adavib", 2, "bbbb2222", "shapes-chair+overrides"))]
    table = results_table_module.results_table(paths)
    rows = table.splitlines()
    assert "| 4 img · aaaa1111 ≠ |" in rows[2] and "| 2 img · bbbb2222 ≠ |" in rows[3]
    assert rows[-1] == ("≠ CHAIR shapes-chair: these rows scored different image sets (4 img · aaaa1111; "
                        "2 img · bbbb2222); their numbers are not comparable.")
    # the same count of other images is marked too; the same set is not
    paths[1] = write(tmp_path / "b" / "metrics.json", chair_run("adavib", 4, "cccc3333"))
    assert "4 img · cccc3333 ≠" in results_table_module.results_table(paths)
    paths[1] = write(tmp_path / "b" / "metrics.json", chair_run("adavib", 4, "aaaa1111"))
    table = results_table_module.results_table(paths)
    assert "≠" not in table and "| 4 img · aaaa1111 |" in table


def test_scorers_record_which_items_they_scored(tmp_path):
    """The identifiers come from the scorers, so every metrics.json evaluate.py writes has them."""
    from minigpt4.eval.chair import score_captions
    from minigpt4.eval.pope import score_pope

    gt = {1: {"dog"}, 2: {"cat"}}
    rows = [{"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "a cat"}]
    first, reordered = score_captions(rows, gt), score_captions(rows[::-1], gt)
    fewer = score_captions(rows[:1], gt)
    assert first["image_set_id"] == reordered["image_set_id"] != fewer["image_set_id"]
    questions = [{"question_id": i, "image": f"{1 + i // 2}.jpg", "label": "yes"} for i in range(4)]
    pope = {}
    for name, count in (("all", 4), ("fewer", 3)):
        (tmp_path / name).mkdir()
        q_path = write(tmp_path / name / "random.jsonl", {})
        q_path.write_text("".join(json.dumps(q) + "\n" for q in questions[:count]))
        a_path = tmp_path / name / "answers.jsonl"
        a_path.write_text("".join(json.dumps({"question_id": q["question_id"], "answer": "yes"}) + "\n"
                                  for q in questions[:count]))
        pope[name] = score_pope([q_path], [a_path])
    assert (pope["all"]["n_questions"], pope["all"]["n_images"]) == (4, 2)
    assert (pope["fewer"]["n_questions"], pope["fewer"]["n_images"]) == (3, 2)
    assert pope["all"]["question_set_id"] != pope["fewer"]["question_set_id"]
