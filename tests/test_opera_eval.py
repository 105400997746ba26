"""OPERA in the evaluation (issue 25): the settings' refusals, the label and the resume fingerprint naming every
parameter, the generation model's own checks, and evaluate.py end to end (tests/test_opera.py tests the method)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from _model_checks import toy_batch

from minigpt4.models.opera import OperaDecoding


# ---- the evaluation -------------------------------------------------------------------------------------------------
def _chair_run(**opera):
    from minigpt4.eval.protocol_runs import resolve_run
    from minigpt4.eval.settings import ChairSettings, EvalSettings, OperaSettings

    settings = EvalSettings(decoding="opera", opera=OperaSettings(**opera), chair=ChairSettings(
        protocol="opera-chair-500"))
    return resolve_run(settings, "chair", "vicuna_v0")


def test_the_label_and_the_fingerprint_record_every_parameter():
    """opera-chair-500 with eval.decoding = opera: OPERA's beams, no stop string, the label and the fingerprint
    naming each parameter; changing any one changes both. The README's faster setting is an option."""
    run = _chair_run()
    label = "opera-chair-500+opera(beams=5,scale=50,threshold=15,candidates=5,penalty=1,window=512)"
    assert run.label == label and run.decoding_name == label.split("+", 1)[1]
    assert run.generate_kwargs() == {"max_new_tokens": 512, "num_beams": 5, "min_new_tokens": 1, "stop_strings": []}
    fields = run.fingerprint_fields()
    assert fields["eval.decoding"] == "opera" and fields["eval.num_beams"] == 5
    assert fields["eval.chair.stop_at_end_string"] is False
    assert {key: fields[f"eval.opera.{key}"] for key in dataclasses.asdict(run.decoding)} == {
        "num_beams": 5, "scale_factor": 50.0, "threshold": 15, "num_attn_candidates": 5, "penalty_weights": 1.0,
        "window_size": 512}
    assert run.summary()["decoding_parameters"]["source"].startswith("shikiw/OPERA")
    changed = {"num_beams": 3, "scale_factor": 20.0, "threshold": 7, "num_attn_candidates": 2, "penalty_weights": 0.5,
               "window_size": 64}
    assert set(changed) == {field.name for field in dataclasses.fields(run.decoding)}
    for key, value in changed.items():
        other = _chair_run(**{key: value})
        assert other.label != label and other.fingerprint_fields()[f"eval.opera.{key}"] == value, key
    fast = _chair_run(setting="fast")
    assert "threshold=25,candidates=1" in fast.label and fast.fingerprint_fields()["eval.opera.threshold"] == 25
    assert "threshold=30,candidates=1" in _chair_run(setting="fast", threshold=30).label


@pytest.mark.parametrize("option, keys", [
    ("eval.opera.num_beams=1", ["eval.opera.num_beams"]), ("eval.opera.scale_factor=0", ["eval.opera.scale_factor"]),
    ("eval.opera.threshold=-1", ["eval.opera.threshold"]),
    ("eval.opera.num_attn_candidates=0", ["eval.opera.num_attn_candidates"]),
    ("eval.opera.penalty_weights=-1", ["eval.opera.penalty_weights"]),
    ("eval.opera.window_size=0", ["eval.opera.window_size"]), ("eval.opera.setting=faster", ["eval.opera.setting"]),
    ("eval.decoding=vcd+opera", ["eval.vcd", "eval.opera"]), ("eval.decoding=opera,vcd", ["eval.vcd", "eval.opera"]),
    ("eval.num_beams=3", ["eval.num_beams", "eval.opera.num_beams"])])
def test_bad_opera_settings_are_refused_naming_the_keys(tmp_path, tiny_tokenizer_dir, capsys, option, keys):
    from test_evaluate import refused_settings_error

    decoding = [] if option.startswith("eval.decoding") else ["eval.decoding=opera"]
    err = refused_settings_error(tmp_path, tiny_tokenizer_dir, capsys, [*decoding, option])
    assert err.count("\n") == 1 and all(key in err for key in keys), err


def test_evaluate_with_opera_labels_fingerprints_and_resumes_only_itself(tmp_path, tiny_model_factory,
                                                                        tiny_tokenizer_dir, capsys, monkeypatch):
    from test_evaluate import random_split_runner

    out, run = random_split_runner(tmp_path, tiny_model_factory, tiny_tokenizer_dir, monkeypatch, "opera",
                                   "eval.opera.num_beams=3", "eval.opera.num_attn_candidates=3")
    assert run(out, "eval.decoding=opera") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    decoding = "opera(beams=3,scale=50,threshold=15,candidates=3,penalty=1,window=512)"
    assert metrics["pope"]["protocol"] == f"single-string-pope+overrides+{decoding}"
    assert metrics["chair"]["protocol"] == f"describe-sampled-500+overrides+{decoding}"
    assert metrics["chair"]["decoding"] == decoding
    assert {k: v for k, v in metrics["protocols"]["pope"]["decoding_parameters"].items() if k != "source"} == {
        "name": "opera", "num_beams": 3, "scale_factor": 50.0, "threshold": 15, "num_attn_candidates": 3,
        "penalty_weights": 1.0, "window_size": 512}
    fields = json.loads((out / "chair_captions.fingerprint.json").read_text())["fields"]
    assert fields["eval.decoding"] == "opera" and fields["eval.opera.num_attn_candidates"] == 3
    assert fields["eval.num_beams"] == 3 and fields["eval.chair.stop_at_end_string"] is False
    answers = (out / "pope_random_answers.jsonl").read_text()
    capsys.readouterr()
    assert run(out) == 2 and "eval.decoding: 'opera' -> '(not recorded)'" in capsys.readouterr().err
    assert run(out, "eval.decoding=opera", "eval.opera.threshold=25") == 2
    assert "eval.opera.threshold: 15 -> 25" in capsys.readouterr().err
    # one question at a time, and from the feature cache: the same answers
    again, cached = tmp_path / "again", tmp_path / "cached"
    assert run(again, "eval.decoding=opera", "eval.tasks=[pope]", "eval.batch_size=1") == 0
    assert (again / "pope_random_answers.jsonl").read_text() == answers
    assert run(cached, "eval.decoding=opera", "eval.tasks=[pope]", f"eval.feature_cache={tmp_path / 'f'}") == 0
    assert (cached / "pope_random_answers.jsonl").read_text() == answers


def test_the_generation_model_refuses_what_it_cannot_honour(tiny_model_factory):
    """generate_with_opera (what answers a batch under OPERA, decodings.generate_answers): another beam count or a
    stop string is refused, not ignored; more candidates than the vocabulary is refused before decoding."""
    from functools import partial

    from minigpt4.eval.decodings import generate_answers
    from minigpt4.models.opera_decoding import opera_token_ids

    model = tiny_model_factory("linear").eval()
    generate = partial(generate_answers, model, decoding=OperaDecoding(num_beams=2, num_attn_candidates=2),
                       image_features=False, item_keys=["1"])
    images = toy_batch(1)["image"]
    prompt = ["###Human: <Img><ImageHere></Img> Describe this image.###Assistant:"]
    with pytest.raises(ValueError, match="2 beams .* num_beams = 5 cannot be honoured"):
        generate(prompt, images, max_new_tokens=2, num_beams=5, stop_strings=[])
    with pytest.raises(ValueError, match=r"pass stop_strings=\[\] \(got None\)"):
        generate(prompt, images, max_new_tokens=2, num_beams=2)
    answers = generate(prompt, images, max_new_tokens=3, num_beams=2, stop_strings=[])
    assert len(answers) == 1 and isinstance(answers[0], str)
    vocab = model.llm.lm_head.weight.shape[0]
    with pytest.raises(ValueError, match=f"num_attn_candidates = {vocab + 1} exceeds the vocabulary"):
        opera_token_ids(model, prompt, model.encode_images(images), OperaDecoding(num_attn_candidates=vocab + 1),
                        max_new_tokens=2)
    with torch.no_grad():  # NaN features: refused at the first step, as greedy decoding refuses them
        from minigpt4.models.numerics import NonFiniteLogitsError

        with pytest.raises(NonFiniteLogitsError):
            opera_token_ids(model, prompt, torch.full_like(model.encode_images(images), float("nan")),
                            OperaDecoding(num_beams=2, num_attn_candidates=2), max_new_tokens=2)
