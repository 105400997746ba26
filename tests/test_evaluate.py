"""evaluate.py end to end on a tiny model and tiny COCO-style fixtures; resumable and sharded generation."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4.eval.generate import GenerationItem, generate_all, read_predictions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATS = [(1, "person"), (18, "dog"), (62, "chair")]


def _write_fixture(root, tiny_model_factory):
    rng = np.random.default_rng(0)
    images = root / "val2014"
    images.mkdir()
    for i in range(1, 5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"COCO_val2014_{i:012d}.jpg")
    pope = root / "pope"
    pope.mkdir()
    qid = 0
    for split in ("random", "adversarial"):
        with open(pope / f"{split}.jsonl", "w") as f:
            for i in range(1, 5):
                for obj, label in (("dog", "yes" if i % 2 else "no"), ("chair", "no")):
                    qid += 1
                    f.write(json.dumps({"question_id": qid, "image": f"COCO_val2014_{i:012d}.jpg",
                                        "text": f"Is there a {obj} in the image?", "label": label}) + "\n")
    ann = root / "annotations"
    ann.mkdir()
    imgs = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(1, 5)]
    inst = {"images": imgs, "categories": [{"id": c, "name": n} for c, n in CATS],
            "annotations": [{"id": i, "image_id": i, "category_id": 18 if i % 2 else 1} for i in range(1, 5)]}
    caps = {"images": imgs,
            "annotations": [{"id": i, "image_id": i, "caption": "a dog and a man"} for i in range(1, 5)]}
    (ann / "instances_val2014.json").write_text(json.dumps(inst))
    (ann / "captions_val2014.json").write_text(json.dumps(caps))
    model = tiny_model_factory("vib", seed=3)
    with torch.no_grad():  # a random LM has near-tied logits; sharpen them so greedy argmax has clear margins
        model.llm.lm_head.weight.mul_(20.0)
    from minigpt4.models.checkpoints import save_state_file

    save_state_file(str(root / "tiny_full.safetensors"), {k: v.contiguous() for k, v in model.state_dict().items()})
    return model


def refused_settings_error(tmp_path, tokenizer_dir, capsys, options: list[str]) -> str:
    """evaluate.py's stderr for a CHAIR run with `options` that must be refused before any model or file is read
    (exit 2); the tests of VCD's and OPERA's settings check what it names."""
    import evaluate

    for folder in ("val2014", "annotations"):
        (tmp_path / folder).mkdir()
    (tmp_path / "tiny_full.safetensors").touch()  # never read: the settings are refused first
    cfg = _eval_cfg(tmp_path, tokenizer_dir, tmp_path / "out")
    assert evaluate.main(["--cfg-path", str(cfg), "--options", *options, "eval.tasks=[chair]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: "), err
    return err


def random_split_runner(tmp_path, tiny_model_factory, tokenizer_dir, monkeypatch, name: str, *fixed: str):
    """(out folder, run): the tiny fixture written under `tmp_path`, and run(folder, *options) evaluating it into
    `folder` on POPE's random split and CHAIR without bootstrap, with `fixed` options on every run (the
    decode-time methods' tests: VCD, OPERA)."""
    import evaluate

    monkeypatch.setenv("HOME", str(tmp_path))
    _write_fixture(tmp_path, tiny_model_factory)
    out = tmp_path / name
    cfg = _eval_cfg(tmp_path, tokenizer_dir, out)

    def run(folder, *options: str) -> int:
        return evaluate.main(["--cfg-path", str(cfg), "--options", f"eval.output_dir={folder}", "eval.bootstrap=0",
                              "eval.pope.splits=[random]", *fixed, *options])

    return out, run


def _eval_cfg(root, tokenizer_dir, out):
    from minigpt4.common.tiny_models import tiny_model_config

    model = tiny_model_config(tokenizer_dir, "vib", full_ckpt=str(root / "tiny_full.safetensors"))
    cfg = {
        "model": model,
        "eval": {"tasks": ["pope", "chair"], "output_dir": str(out), "name": "tiny", "image_dir": str(root / "val2014"),
                 "batch_size": 3, "device": "cpu", "bootstrap": 50,
                 "vis_processor": {"name": "blip2_image_eval", "image_size": 28},
                 "pope": {"dir": str(root / "pope"), "splits": ["random", "adversarial"], "max_new_tokens": 4},
                 "chair": {"coco_annotations": str(root / "annotations"), "num_images": 3, "max_new_tokens": 8}},
    }
    path = root / f"eval_{out.name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def fixture_root(tmp_path, tiny_model_factory, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # CHAIR GT cache goes under ~/.cache
    _write_fixture(tmp_path, tiny_model_factory)
    return tmp_path


def test_evaluate_end_to_end_then_results_table(fixture_root, tiny_tokenizer_dir):
    import evaluate

    out = fixture_root / "out1"
    cfg = _eval_cfg(fixture_root, tiny_tokenizer_dir, out)
    assert evaluate.main(["--cfg-path", str(cfg)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "tiny" and metrics["projector"].startswith("adavib (β=")
    assert set(metrics["pope"]["splits"]) == {"random", "adversarial"}
    for key in ("chair_s", "chair_i", "recall", "mean_length"):
        assert key in metrics["chair"]
    # The POPE numbers are those of the answers written, recomputed here by hand. The reference rule: an answer is
    # "no" when one of its words (split on spaces after dropping "." and ",") is No, no, not or NO, or ends in n't.
    assert metrics["pope"]["rule"] == "reference"
    for split in ("random", "adversarial"):
        labels = {q["question_id"]: q["label"]
                  for q in map(json.loads, (fixture_root / "pope" / f"{split}.jsonl").read_text().splitlines())}
        said = {a["question_id"]: a["answer"].split("###")[0].strip()
                for a in map(json.loads, (out / f"pope_{split}_answers.jsonl").read_text().splitlines())}
        assert set(said) == set(labels)
        words = {qid: answer.replace(".", "").replace(",", "").split(" ") for qid, answer in said.items()}
        said_yes = {qid: not any(w in ("No", "no", "not", "NO") or w.endswith("n't") for w in ws)
                    for qid, ws in words.items()}
        scored = metrics["pope"]["splits"][split]
        assert scored["accuracy"] == pytest.approx(
            sum(said_yes[qid] == (label == "yes") for qid, label in labels.items()) / len(labels))
        assert scored["yes_ratio"] == pytest.approx(sum(said_yes.values()) / len(said_yes))
    lines = (out / "pope_random_answers.jsonl").read_text().splitlines()
    assert len(lines) == 8 and len({json.loads(x)["question_id"] for x in lines}) == 8
    assert len((out / "chair_captions.jsonl").read_text().splitlines()) == 3
    table = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/results_table.py"), str(out / "metrics.json")],
                           capture_output=True, text=True, check=True).stdout
    assert "| tiny" in table and "CHAIR_S" in table
    # Rerun: everything is done already, nothing is generated twice.
    assert evaluate.main(["--cfg-path", str(cfg)]) == 0
    assert (out / "pope_random_answers.jsonl").read_text().splitlines() == lines


def test_the_plan_resolves_each_protocol_and_reads_each_item_once(fixture_root, tiny_tokenizer_dir, monkeypatch):
    """Issue 24 item 1: the evaluation plan is built once (settings -> each task's protocol run -> its items -> its
    fingerprint) and passed down; validation, the fingerprints and the task runs do not resolve the protocol again,
    and the task runs answer the plan's items instead of reading the benchmark files a second time."""
    import evaluate
    from minigpt4.eval import benchmark_runs, protocol_runs

    resolved, read = [], []
    resolve_run, pope_items = protocol_runs.resolve_run, benchmark_runs.pope_items
    monkeypatch.setattr(protocol_runs, "resolve_run", lambda ev, task, template: resolved.append(task) or
                        resolve_run(ev, task, template))
    monkeypatch.setattr(benchmark_runs, "pope_items", lambda settings, split, run: read.append(split) or
                        pope_items(settings, split, run))
    cfg = _eval_cfg(fixture_root, tiny_tokenizer_dir, fixture_root / "once")
    assert evaluate.main(["--cfg-path", str(cfg)]) == 0
    assert sorted(resolved) == ["chair", "pope"] and sorted(read) == ["adversarial", "random"], (resolved, read)


def test_evaluate_config_errors_name_the_key(fixture_root, tiny_tokenizer_dir, capsys):
    import evaluate

    cfg = _eval_cfg(fixture_root, tiny_tokenizer_dir, fixture_root / "outx")
    assert evaluate.main(["--cfg-path", str(cfg), "--options", "eval.bogus=1"]) == 2
    assert "eval.bogus" in capsys.readouterr().err
    assert evaluate.main(["--cfg-path", str(cfg), "--options", "eval.image_dir=/nope"]) == 2
    assert "eval.image_dir" in capsys.readouterr().err
    assert evaluate.main(["--cfg-path", str(cfg), "--options", "model.mm_projector_type=mlp3"]) == 2
    assert "mm_projector_type" in capsys.readouterr().err


class _Boom(RuntimeError):
    pass


def test_generation_resumes_without_loss_or_duplicates(tmp_path, tiny_model_factory):
    model = tiny_model_factory("linear").eval()
    g = torch.Generator().manual_seed(0)
    pixels = {f"img{i}": torch.randn(3, 28, 28, generator=g) for i in range(7)}
    items = [GenerationItem(key=str(i), image=f"img{i}", prompt=f"###Human: <Img><ImageHere></Img> q{i}###Assistant:")
             for i in range(7)]
    kwargs = dict(batch_size=2, generate_kwargs={"max_new_tokens": 3})
    full = generate_all(model, items, out_path=str(tmp_path / "a.jsonl"), load_image=pixels.__getitem__, **kwargs)

    calls = {"n": 0}

    def flaky(name):
        calls["n"] += 1
        if calls["n"] > 4:  # dies after two batches
            raise _Boom()
        return pixels[name]

    out = str(tmp_path / "b.jsonl")
    with pytest.raises(_Boom):
        generate_all(model, items, out_path=out, load_image=flaky, **kwargs)
    with open(out + ".part0", "a") as f:
        f.write('{"key": "6", "answ')  # a torn line from a kill mid-write
    resumed = generate_all(model, items, out_path=out, load_image=pixels.__getitem__, **kwargs)
    lines = [json.loads(x) for x in open(out).read().splitlines()]
    assert [row["key"] for row in lines] == [it.key for it in items]  # exactly once each, in item order
    assert {k: v["answer"] for k, v in resumed.items()} == {k: v["answer"] for k, v in full.items()}
    assert read_predictions(out).keys() == full.keys()


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(fixture_root, tiny_tokenizer_dir):
    one = fixture_root / "one"
    two = fixture_root / "two"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for out, launcher in ((one, [sys.executable]),
                          (two, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])):
        cfg = _eval_cfg(fixture_root, tiny_tokenizer_dir, out)
        proc = subprocess.run(launcher + [os.path.join(ROOT, "evaluate.py"), "--cfg-path", str(cfg),
                                          "--options", "eval.tasks=[pope]", "eval.bootstrap=0"],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for split in ("random", "adversarial"):
        a = [json.loads(x) for x in (one / f"pope_{split}_answers.jsonl").read_text().splitlines()]
        b = [json.loads(x) for x in (two / f"pope_{split}_answers.jsonl").read_text().splitlines()]
        assert [(r["key"], r["answer"]) for r in a] == [(r["key"], r["answer"]) for r in b]
        assert a == b
    assert json.loads((one / "metrics.json").read_text())["pope"]["mean"] == \
        json.loads((two / "metrics.json").read_text())["pope"]["mean"]


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def test_resume_refuses_answers_of_another_model_or_settings_and_reuses_its_own(
        fixture_root, tiny_tokenizer_dir, tiny_model_factory, capsys, monkeypatch):
    """Issue 13 item 1: a finished folder evaluated again with another checkpoint / prompt / max_new_tokens used to
    return the old model's answers and metrics with exit 0. Now refused, before the model is built; the same
    settings still resume and reuse every stored answer."""
    import evaluate
    from minigpt4.models import from_config as builder
    from minigpt4.models.minigpt4 import MiniGPT4

    out = fixture_root / "fp"
    cfg = _eval_cfg(fixture_root, tiny_tokenizer_dir, out)
    def run(*options):
        return evaluate.main(["--cfg-path", str(cfg), "--options", "eval.bootstrap=0", *options])

    assert run() == 0
    stored = {p.name: p.read_text() for p in out.iterdir() if p.suffix in (".jsonl", ".json")}
    assert (out / "pope_random_answers.fingerprint.json").is_file()
    assert (out / "chair_captions.fingerprint.json").is_file()
    other = tiny_model_factory("vib", seed=4)  # same architecture, other weights
    from minigpt4.models.checkpoints import save_state_file

    save_state_file(str(fixture_root / "other_full.safetensors"),
                    {k: v.contiguous() for k, v in other.state_dict().items()})

    def refuse(*_, **__):
        raise AssertionError("refusing to resume must not need the model")

    changes = [
        (f"model.full_ckpt={fixture_root / 'other_full.safetensors'}", "model.full_ckpt: 'sha256:"),
        ("eval.pope.question_suffix=' Answer yes or no.'", "eval.pope.question_suffix: '' -> ' Answer yes or no.'"),
        ("eval.pope.max_new_tokens=5", "eval.pope.max_new_tokens: 4 -> 5"),
        ("eval.chair.max_new_tokens=9", "eval.chair.max_new_tokens: 8 -> 9"),
        ("eval.system='You are a helpful assistant. '", "eval.system:"),
        ("eval.pope.protocol=adavib-pope", "eval.pope.protocol: 'single-string-pope' -> 'adavib-pope'"),
        ("eval.vis_processor.image_size=32", "eval.vis_processor.image_size: 28 -> 32"),
    ]
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(builder, "build_model", refuse)
        for option, fragment in changes:
            tasks = ["eval.tasks=[chair]"] if option.startswith("eval.chair") else []
            assert run(option, *tasks) == 2, option
            err = _last_line(capsys.readouterr().err)
            assert err.startswith("error: ") and "other settings" in err and fragment in err, (option, err)
            assert f"set another eval.output_dir or delete {out}" in err
        # answers without a fingerprint (made before fingerprints existed): nothing says which model made them
        (out / "pope_random_answers.fingerprint.json").rename(out / "kept.json")
        assert run() == 2
        assert "no pope_random_answers.fingerprint.json records which model" in capsys.readouterr().err
        (out / "kept.json").rename(out / "pope_random_answers.fingerprint.json")
    assert {p.name: p.read_text() for p in out.iterdir() if p.name in stored} == stored  # nothing was touched

    # The same settings resume: drop two answers as a kill would, and only those two are generated again.
    answers = (out / "pope_random_answers.jsonl").read_text().splitlines(keepends=True)
    (out / "pope_random_answers.jsonl").write_text("".join(answers[:-2]))
    generated = []
    original = MiniGPT4.generate

    def counting(self, prompts, *args, **kwargs):
        generated.extend(prompts)
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(MiniGPT4, "generate", counting)
    assert run() == 0
    assert len(generated) == 2
    assert {p.name: p.read_text() for p in out.iterdir() if p.suffix == ".jsonl"} == \
        {name: text for name, text in stored.items() if name.endswith(".jsonl")}
    assert json.loads((out / "metrics.json").read_text()) == json.loads(stored["metrics.json"])


def test_resume_refuses_a_changed_question_for_a_stored_answer(fixture_root, tiny_tokenizer_dir, capsys):
    """A question file edited under the same question_id: the stored answer was made for another prompt."""
    import evaluate

    out = fixture_root / "fq"
    cfg = _eval_cfg(fixture_root, tiny_tokenizer_dir, out)
    def run():
        return evaluate.main(["--cfg-path", str(cfg), "--options", "eval.tasks=[pope]", "eval.bootstrap=0"])

    assert run() == 0
    questions = fixture_root / "pope" / "random.jsonl"
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    rows[0]["text"] = "Is there a cat in the image?"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert run() == 2
    err = _last_line(capsys.readouterr().err)
    assert err.startswith("error: ") and "stored answer for key '1' was made for another prompt" in err, err
    assert "dog" in err and "cat" in err and f"delete {out}" in err


def test_protocol_label_follows_the_settings(fixture_root, tiny_tokenizer_dir):
    """A run is labelled by its named protocol, and NAME+overrides, with the changed keys in metrics.json, as soon
    as a key on top changes what the protocol says (issue 13 item 1, issue 14); never under the plain name."""
    import evaluate

    out = fixture_root / "label"
    cfg = _eval_cfg(fixture_root, tiny_tokenizer_dir, out)
    options = ["eval.tasks=[pope,chair]", "eval.bootstrap=0", "eval.pope.protocol=adavib-pope",
               "eval.pope.max_new_tokens=10", "eval.chair.protocol=describe-sampled-500"]
    assert evaluate.main(["--cfg-path", str(cfg), "--options", *options]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocols"]["pope"]["label"] == "adavib-pope"  # 10 is the protocol's own value: no override
    assert "jiaqi5598/AdaVIB" in metrics["protocols"]["pope"]["source"]
    assert metrics["protocols"]["chair"]["label"] == metrics["chair"]["protocol"] == "describe-sampled-500+overrides"
    assert metrics["chair"]["protocol_overrides"] == {"eval.chair.num_images": {"protocol": 500, "used": 3},
                                                      "eval.chair.max_new_tokens": {"protocol": 512, "used": 8}}
    assert metrics["protocol"] == f"adavib-pope (dir {fixture_root / 'pope'}) + describe-sampled-500+overrides"
    captions = [json.loads(x) for x in (out / "chair_captions.jsonl").read_text().splitlines()]
    assert all("\x1f" not in row["prompt"] for row in captions)  # one string after the image
    answers = [json.loads(x) for x in (out / "pope_random_answers.jsonl").read_text().splitlines()]
    assert answers[0]["prompt"].endswith("</Img> \x1fis there a dog in the image?\x1f###Assistant:")
    # fewer images: the stored captions of the same settings are reused, and the override lists the new count
    assert evaluate.main(["--cfg-path", str(cfg), "--options", *options, "eval.chair.num_images=2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["chair"]["protocol_overrides"]["eval.chair.num_images"] == {"protocol": 500, "used": 2}
    assert metrics["chair"]["n_captions"] == 2


def _counting_generate(monkeypatch) -> list:
    """Every prompt MiniGPT4.generate is asked from now on."""
    from minigpt4.models.minigpt4 import MiniGPT4

    asked, original = [], MiniGPT4.generate

    def counting(self, prompts, *args, **kwargs):
        asked.extend(prompts)
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(MiniGPT4, "generate", counting)
    return asked


def _answer_lines(out) -> dict:
    return {p.name: p.read_text().splitlines() for p in out.glob("*.jsonl")}


def test_a_smaller_rerun_keeps_every_stored_answer_and_the_larger_one_generates_nothing(
        fixture_root, tiny_tokenizer_dir, monkeypatch):
    """Issue 22 item 1: rerunning a finished folder with fewer CHAIR images or POPE questions rewrote the answers
    files with only those (4 captions became 2, 120 answers 48). Now every stored answer stays, only the asked ones
    are scored, the result counts the others, and the full run afterwards has nothing left to generate."""
    import evaluate

    out = fixture_root / "subset"
    cfg = _eval_cfg(fixture_root, tiny_tokenizer_dir, out)
    small = fixture_root / "pope_small"  # the first 3 questions of each split
    small.mkdir()
    for split in ("random", "adversarial"):
        lines = (fixture_root / "pope" / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (small / f"{split}.jsonl").write_text("".join(lines[:3]))
    def run(*options):
        return evaluate.main(["--cfg-path", str(cfg), "--options", "eval.bootstrap=0", *options])

    assert run() == 0
    stored, full_metrics = _answer_lines(out), json.loads((out / "metrics.json").read_text())
    assert full_metrics["chair"]["stored_answers_not_in_this_run"] == 0
    assert full_metrics["pope"]["stored_answers_not_in_this_run"] == {"random": 0, "adversarial": 0}

    asked = _counting_generate(monkeypatch)
    assert run(f"eval.pope.dir={small}", "eval.chair.num_images=2") == 0
    assert asked == []  # every asked item was stored
    after = _answer_lines(out)
    assert {name: sorted(lines) for name, lines in after.items()} == \
        {name: sorted(lines) for name, lines in stored.items()}  # nothing dropped, nothing added
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["chair"]["n_captions"] == 2 and metrics["chair"]["stored_answers_not_in_this_run"] == 1
    assert metrics["pope"]["stored_answers_not_in_this_run"] == {"random": 5, "adversarial": 5}
    assert all(split["n"] == 3 for split in metrics["pope"]["splits"].values())
    assert len((out / "pope_scored_answers" / "random.jsonl").read_text().splitlines()) == 3

    assert run() == 0  # the full run again: all of it is stored
    assert asked == []
    assert _answer_lines(out) == stored  # merged back into the items' order
    assert json.loads((out / "metrics.json").read_text()) == full_metrics
    assert not (out / "pope_scored_answers" / "random.jsonl").exists()  # the smaller run's copy is not left behind


def test_resume_refuses_answers_to_images_replaced_under_the_same_names(fixture_root, tiny_tokenizer_dir, capsys,
                                                                        monkeypatch):
    """Issue 22 item 2: new pictures under the old file names were scored with the old captions (the fingerprint
    knew only the folder). Each answer records its image's SHA-256; a replaced image is refused like a changed
    prompt, before the model is built. A file only touched (same bytes, new mtime) still resumes."""
    import evaluate
    from minigpt4.models import from_config as builder

    out = fixture_root / "replaced"
    cfg = _eval_cfg(fixture_root, tiny_tokenizer_dir, out)
    def run():
        return evaluate.main(["--cfg-path", str(cfg), "--options", "eval.bootstrap=0"])

    assert run() == 0
    stored = _answer_lines(out)
    assert all(len(json.loads(line)["image_sha256"]) == 64 for lines in stored.values() for line in lines)

    images = sorted((fixture_root / "val2014").iterdir())
    for path in images:  # same bytes, later mtime: hashed again, and the same
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    asked = _counting_generate(monkeypatch)
    assert run() == 0 and asked == []

    rng = np.random.default_rng(1)
    for path in images:  # other pictures, same names
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(builder, "build_model", lambda *_, **__: pytest.fail("refusing must not need the model"))
        assert run() == 2
    err = _last_line(capsys.readouterr().err)
    assert err.startswith("error: ") and "pope_random_answers.jsonl: the stored answer for key '1'" in err, err
    assert "was made for another image_sha256" in err and f"the image file {images[0]} was replaced" in err, err
    assert f"delete {out}" in err and _answer_lines(out) == stored


def test_a_prompt_longer_than_the_llm_positions_is_refused_before_generation(fixture_root, tiny_tokenizer_dir,
                                                                             capsys, monkeypatch):
    """Issue 22 item 2: a question beyond max_position_embeddings was answered with exit 0. The prompt's tokens
    (visual ones included) plus max_new_tokens must fit the LLM's positions; refused naming the item and both."""
    import evaluate

    out = fixture_root / "long"
    cfg = _eval_cfg(fixture_root, tiny_tokenizer_dir, out)
    asked = _counting_generate(monkeypatch)
    capsys.readouterr()
    assert evaluate.main(["--cfg-path", str(cfg), "--options", "eval.tasks=[pope]",
                          "eval.pope.question_suffix='" + " and a dog" * 200 + "'"]) == 2
    err = _last_line(capsys.readouterr().err)
    assert err.startswith("error: ") and f"{fixture_root / 'pope' / 'random.jsonl'}: question_id 1, image " \
        "'COCO_val2014_000000000001.jpg': the prompt is " in err, err
    assert "(with 4 visual tokens) + eval.pope.max_new_tokens = 4 = " in err, err
    assert "positions, more than the LLM's max_position_embeddings = 512" in err, err
    assert asked == [] and not list(out.glob("*.jsonl"))


def test_prompt_length_check_counts_prompt_visual_and_new_tokens(tiny_model_factory):
    """The bound: len(prompt tokens, BOS and visual tokens included) + max_new_tokens <= max_position_embeddings."""
    from minigpt4.common.config import ConfigError
    from minigpt4.eval.generate import check_prompt_lengths

    model = tiny_model_factory("linear")
    item = GenerationItem(key="7", image="x.jpg", extra={"question_id": 7},
                          prompt="###Human: <Img><ImageHere></Img> Is there a dog?###Assistant:")
    before, after = model.prompt_tokenizer.prompt_ids(item.prompt)
    used = len(before) + model.num_query_tokens + len(after)
    limit = model.llm.config.max_position_embeddings
    check_prompt_lengths(model, [item], limit - used, "eval.pope.max_new_tokens", "q.jsonl")  # exactly full: fine
    with pytest.raises(ConfigError, match=rf"q.jsonl: question_id 7: the prompt is {used} tokens .* = {limit + 1} "
                                          rf"positions, more than the LLM's max_position_embeddings = {limit}"):
        check_prompt_lengths(model, [item], limit - used + 1, "eval.pope.max_new_tokens", "q.jsonl")
