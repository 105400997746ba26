"""Export to Hugging Face formats (minigpt4/export): the committed shapes-world MiniGPT-4 with a VIB projector ->
BLIP-2 folder + MiniGPT-4 .pth; a tiny LLaVA-1.5 -> llava-hf folder. Each export is reloaded in a subprocess with
transformers' classes only (tests/_hf_reload.py refuses to import this project) and must give this project's
greedy tokens on several images and prompts; the one measured difference (BLIP-2's post_layernorm eps) is shown
to be the only one. Also: the original MiniGPT-4 key layout, the VIB side file, the model card, --check, and the
exporter's refusals."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from minigpt4.export import cli

ROOT = Path(__file__).resolve().parents[1]
SHAPES_YAML = ROOT / "assets" / "shapes_base" / "model.yaml"
QUESTIONS = ["Describe this image.", "Is there a star in the image?", "What colour is the largest shape?"]
MAX_NEW = 20
METRICS = {
    "model": "shapes-adavib", "projector": "adavib (β=0.001, S=3)",
    "protocol": "pope-shapes-2024-reference + shapes-val-300img-64tok",
    "chair": {"chair_s": 0.12, "chair_i": 0.0512, "recall": 0.902, "mean_length": 14.7, "n_captions": 300,
              "n_images": 300, "bootstrap": {"ci": {"chair_i": [0.035, 0.067]}}},
    "pope": {"rule": "reference", "splits": {"random": {"accuracy": 0.906, "f1": 0.905}}},
}


class TokenCollector:
    """A generate() streamer that keeps the token ids (the new tokens only: the prompt is inputs_embeds)."""

    def __init__(self):
        self.ids: list[int] = []

    def put(self, value):
        self.ids += value.reshape(-1).tolist()

    def end(self):
        pass


def our_run(model, pixels: torch.Tensor, question: str) -> dict:
    """This project's greedy tokens, prompt ids (image slots as `image_id` later) and last-position logits."""
    prompt = model.template.prompt(question)
    collect = TokenCollector()
    model.generate([prompt], pixels[None], max_new_tokens=MAX_NEW, streamer=collect)
    with torch.no_grad():
        tokens, _ = model.project(model.encode_images(pixels[None]))
        text = model.build_generation_text([prompt])
        logits = model.llm(inputs_embeds=model.embed(text, tokens), attention_mask=text.attention_mask).logits
    return {"tokens": collect.ids, "prompt_ids": text.input_ids[0].tolist(), "mask": text.image_mask[0].tolist(),
            "last_logits": logits[0, -1]}


def reload_in_subprocess(tmp: Path, folder: Path, cls: str, images: list[Image.Image], stop: str | None,
                         eps: list[float | None]) -> dict:
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp / f"image_{i}.png"))
        image.save(paths[-1])
    spec = {"folder": str(folder), "class": cls, "images": paths, "questions": QUESTIONS, "max_new_tokens": MAX_NEW,
            "stop": stop, "eps": eps}
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_hf_reload.py"), str(tmp / "spec.json"),
                           str(tmp / "result.json")], capture_output=True, text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp / "result.json").read_text())
    assert not result["loaded"]["minigpt4_imported"]
    assert all(not v for v in result["loaded"]["loading_info"].values()), result["loaded"]["loading_info"]
    return result


def compare(ours: list[dict], theirs: list[dict], image_id: int) -> dict:
    """Token sequences that differ, prompt ids that differ, and the largest last-position logit difference."""
    differing = sum(a["tokens"] != b["tokens"] for a, b in zip(ours, theirs, strict=True))
    prompts = sum([image_id if m else t for t, m in zip(a["prompt_ids"], a["mask"])] != b["prompt_ids"]
                  for a, b in zip(ours, theirs))
    logit_gap = max((a["last_logits"] - torch.tensor(b["last_logits"])[: a["last_logits"].shape[0]]).abs().max().item()
                    for a, b in zip(ours, theirs))
    return {"sequences_differing": differing, "prompts_differing": prompts, "max_logit_gap": logit_gap,
            "tokens": sum(len(a["tokens"]) for a in ours)}


# ---------------------------------------------------------------------------------------------- MiniGPT-4


@pytest.fixture(scope="module")
def shapes_images() -> list[Image.Image]:
    from minigpt4.shapes.world.scenes import render_image, sample_scene

    rng = np.random.default_rng(11)
    return [render_image(sample_scene(rng, 64, 0.9), 64, rng) for _ in range(4)]


@pytest.fixture(scope="module")
def minigpt4_run(tmp_path_factory) -> tuple[Path, object]:
    """A 'trained' VIB run on the shapes base model: run/final/{trainable.safetensors, config.json}."""
    from minigpt4.common.config_files import load_model_config
    from minigpt4.models.checkpoints import save_trainable, trainable_tensors
    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)
    model = build_model(load_model_config(SHAPES_YAML, ["model.mm_projector_type=vib"])).eval()
    with torch.no_grad():  # μ moves away from the base projector: the export must carry the checkpoint's μ
        model.projector.llama_proj.weight.add_(0.02 * torch.randn_like(model.projector.llama_proj.weight))
    run = tmp_path_factory.mktemp("shapes_vib_run")
    save_trainable(run / "final" / "trainable.safetensors", trainable_tensors(model))
    train_config = {"model": {"arch": "minigpt4", "mm_projector_type": "vib",
                              "vib": {"num_samples": 3, "beta": 1e-3, "adaptive": True, "kl_on": "pooled",
                                      "reparameterize": True, "std_head": "same"}},
                    "datasets": {"shapes_qa": {"root": "data/shapes_world"}},
                    "run": {"init_lr": 1e-3, "batch_size": 32, "seed": 0, "max_epoch": 1}}
    (run / "final" / "config.json").write_text(json.dumps(train_config))
    weights = evaluated_weights(["model.mm_projector_type=vib", f"model.ckpt={run}/final/trainable.safetensors"])
    (run / "metrics.json").write_text(json.dumps({**METRICS, "weights": weights}))
    return run, model


def evaluated_weights(options: list[str], cfg_path: Path = SHAPES_YAML) -> dict:
    """metrics.json's "weights" as evaluate.py writes it for the model config `cfg_path` + `options`."""
    from minigpt4.common.config_files import load_model_config
    from minigpt4.common.provenance import weight_digests
    from minigpt4.export.records import weight_paths

    return weight_digests(weight_paths(load_model_config(cfg_path, options)))


@pytest.fixture(scope="module")
def minigpt4_export(minigpt4_run, tmp_path_factory) -> Path:
    run, _ = minigpt4_run
    out = tmp_path_factory.mktemp("exports") / "shapes-adavib"
    rc = cli.main(["--cfg-path", str(SHAPES_YAML), "--options", "model.mm_projector_type=vib",
                   "--ckpt", str(run / "final" / "trainable.safetensors"), "--metrics", str(run / "metrics.json"),
                   "--out", str(out)])
    assert rc == 0
    return out


def test_blip2_export_gives_this_projects_greedy_tokens(minigpt4_run, minigpt4_export, shapes_images, tmp_path):
    from minigpt4.processors.image import build_image_processor

    _, model = minigpt4_run
    process = build_image_processor({"name": "blip2_image_eval", "image_size": 64})
    ours = [our_run(model, process(image), q) for image in shapes_images for q in QUESTIONS]
    result = reload_in_subprocess(tmp_path, minigpt4_export, "Blip2ForConditionalGeneration", shapes_images, "###",
                                  eps=[None, 1e-5])
    image_id = json.loads((minigpt4_export / "config.json").read_text())["image_token_index"]
    exported = compare(ours, result["runs"]["None"], image_id)
    exact = compare(ours, result["runs"]["1e-05"], image_id)
    print(f"\nBLIP-2 export, as written: {exported}\nwith post_layernorm.eps = 1e-5: {exact}")
    # The visual tokens sit where MiniGPT-4 puts them, every prompt id equal.
    assert exported["prompts_differing"] == 0 and exact["prompts_differing"] == 0
    # With MiniGPT-4's ln_vision eps the reloaded model computes exactly this one (measured: logit gap 0.0) ...
    assert exact["sequences_differing"] == 0 and exact["max_logit_gap"] < 1e-5
    # ... so the eps is the only difference. As exported it moves the logits (measured 1.6e-5) and no greedy
    # token of these 12 generations (121 tokens). Allowed: that difference, no more.
    assert exported["sequences_differing"] == 0
    assert 0 < exported["max_logit_gap"] < 1e-3
    assert exported["tokens"] > 3 * len(ours)  # the answers are real text, not an immediate stop


def test_minigpt4_projector_pth_loads_into_the_original_key_layout(minigpt4_run, minigpt4_export):
    _, model = minigpt4_run
    checkpoint = torch.load(minigpt4_export / "minigpt4_projector.pth", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model"} and set(checkpoint["model"]) == {"llama_proj.weight", "llama_proj.bias"}

    class OriginalMiniGPT4Layout(nn.Module):  # Vision-CAIR/MiniGPT-4 mini_gpt4.py: attribute names of MiniGPT4
        def __init__(self, qformer_width: int, llm_width: int):
            super().__init__()
            self.query_tokens = nn.Parameter(torch.zeros(1, 8, qformer_width))
            self.ln_vision = nn.LayerNorm(qformer_width)
            self.llama_proj = nn.Linear(qformer_width, llm_width)

    original = OriginalMiniGPT4Layout(128, 128)
    missing, unexpected = original.load_state_dict(checkpoint["model"], strict=False)  # as the original loads it
    assert unexpected == [] and set(missing) == {"query_tokens", "ln_vision.weight", "ln_vision.bias"}
    assert torch.equal(original.llama_proj.weight, model.projector.llama_proj.weight.float())
    assert torch.equal(original.llama_proj.bias, model.projector.llama_proj.bias.float())


def test_vib_side_file_rebuilds_the_trainable_checkpoint(minigpt4_run, minigpt4_export, tmp_path):
    from minigpt4.models.checkpoints import load_state_file

    run, _ = minigpt4_run
    assert cli.main(["--to-trainable", str(minigpt4_export), "--out", str(tmp_path / "t.safetensors")]) == 0
    rebuilt = load_state_file(tmp_path / "t.safetensors")
    original = load_state_file(run / "final" / "trainable.safetensors")
    assert set(rebuilt) == set(original)
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)
    side = load_state_file(minigpt4_export / "adavib_vib_head.safetensors")
    assert set(side) == {"projector.llama_proj_std.weight", "projector.llama_proj_std.bias", "projector.mu_p",
                         "projector.std_p"}


def test_model_card_names_weights_recipe_and_results(minigpt4_export):
    card = (minigpt4_export / "README.md").read_text()
    manifest = json.loads((minigpt4_export / "adavib_export.json").read_text())
    assert "library_name: transformers" in card and "adavib (β=0.001, S=3)" in card
    assert "β = 0.001, S = 3 noise samples" in card and "Resolved training config" in card
    assert '"init_lr": 0.001' in card
    assert manifest["sources"]["model.full_ckpt"]["sha256"] in card
    assert "pope-shapes-2024-reference + shapes-val-300img-64tok" in card and "5.1 ± 1.6" in card
    assert "ln_vision eps** (differs)" in card and "prompt tokens** (checked at export)" in card
    assert manifest["formats"]["blip2-hf"]["prompt_check"]["equal"]


def test_check_reports_what_transformers_loaded(minigpt4_export, capsys):
    assert cli.main(["--check", str(minigpt4_export)]) == 0
    report = capsys.readouterr().out
    assert "class: Blip2ForConditionalGeneration" in report and "processor: Blip2Processor" in report
    assert "image_processor: BlipImageProcessorPil" in report and "greedy answer on a grey image" in report
    side = {line.split(":")[0].strip(): line for line in report.splitlines()}
    assert "projector.llama_proj_std.weight (128, 128)" in side["adavib_vib_head.safetensors"]
    assert "llama_proj.weight (128, 128)" in side["minigpt4_projector.pth"]


def test_prompt_check_says_where_the_ids_differ(minigpt4_run, minigpt4_export, monkeypatch):
    from transformers import AutoProcessor

    from minigpt4.conversation.templates import get_template
    from minigpt4.export.hf_parts import prompt_token_check

    _, model = minigpt4_run
    processor = AutoProcessor.from_pretrained(minigpt4_export, backend="pil")
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    assert prompt_token_check(model, processor, image)["equal"]
    monkeypatch.setattr(model, "template", get_template("llama2"))  # this model now prompts "[INST] <Img>…"
    check = prompt_token_check(model, processor, image)
    assert not check["equal"] and check["first_difference"] == 1  # right after BOS
    assert check["this_project_ids_near"][:1] == check["export_ids_near"][:1] == [model.tokenizer.bos_token_id]
    assert check["this_project_tokens_near"] != check["export_tokens_near"]


# ----------------------------------------------------------------------------------------------- LLaVA-1.5


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny llava-hf folder, a VIB model on it with a 'trained' μ head, and that run's trainable file."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from minigpt4.common.config import ModelConfig, merge
    from minigpt4.common.tiny_models import TINY_LLM
    from minigpt4.models.checkpoints import save_trainable, trainable_tensors
    from minigpt4.models.from_config import build_model
    from minigpt4.models.llava import llava_config_from

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14)
    model_cfg = dict(arch="llava15", tokenizer_path=tiny_tokenizer_dir, vision=vision, llm=dict(TINY_LLM),
                     mm_projector_type="vib", prompt_template="llava15", llm_dtype="fp32", encoder_dtype="fp32",
                     max_txt_len=64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(5)
    folder = tmp_path_factory.mktemp("tiny_llava_hf")
    LlavaForConditionalGeneration(llava_config_from(merge(ModelConfig, model_cfg), tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model_cfg.update(llava_path=str(folder), vision={}, llm={})
    torch.manual_seed(1)
    model = build_model(model_cfg).eval()
    with torch.no_grad():
        model.projector.llama_proj.linear_2.weight.mul_(3.0)  # sharper logits; and μ differs from the folder's
    run = tmp_path_factory.mktemp("llava_vib_run")
    save_trainable(run / "trainable.safetensors", trainable_tensors(model))
    config = run / "model.yaml"
    config.write_text(json.dumps({"model": model_cfg}))  # JSON is YAML
    return config, run / "trainable.safetensors", model


def test_llava_export_gives_this_projects_greedy_tokens(llava_run, tmp_path):
    from minigpt4.processors.image import build_image_processor

    config, ckpt, model = llava_run
    out = tmp_path / "llava-export"
    assert cli.main(["--cfg-path", str(config), "--ckpt", str(ckpt), "--out", str(out)]) == 0
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 30), (28, 28),
                                                                                            (20, 50))]
    process = build_image_processor({"name": "clip_image_eval", "image_size": 28})
    ours = [our_run(model, process(image), q) for image in images for q in QUESTIONS]
    result = reload_in_subprocess(tmp_path, out, "LlavaForConditionalGeneration", images, None, eps=[None])
    image_id = json.loads((out / "config.json").read_text())["image_token_index"]
    exported = compare(ours, result["runs"]["None"], image_id)
    print(f"\nllava-hf export: {exported}")
    assert exported == {**exported, "sequences_differing": 0, "prompts_differing": 0}
    assert exported["max_logit_gap"] < 1e-4
    assert (out / "adavib_vib_head.safetensors").is_file() and not (out / "minigpt4_projector.pth").exists()
    processor_config = json.loads((out / "processor_config.json").read_text())
    assert processor_config["image_processor"]["do_pad"] is True
    assert processor_config["image_processor"]["size"] == {"shortest_edge": 28}


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("case", ["linear-ckpt-for-vib", "missing-ckpt", "format-cannot-hold", "random-llm",
                                  "out-not-empty", "bad-metrics", "check-not-an-export"])
def test_exporter_refuses_bad_input_with_one_line(case, tmp_path, capsys):
    from minigpt4.models.checkpoints import save_trainable

    linear = tmp_path / "linear.safetensors"
    save_trainable(linear, {"projector.llama_proj.weight": torch.zeros(128, 128),
                            "projector.llama_proj.bias": torch.zeros(128)})
    base = ["--cfg-path", str(SHAPES_YAML), "--out", str(tmp_path / "out")]
    argv, expected = {
        "linear-ckpt-for-vib": (base + ["--options", "model.mm_projector_type=vib", "--ckpt", str(linear)],
                                "holds a linear projector"),
        "missing-ckpt": (base + ["--ckpt", str(tmp_path / "nope.safetensors")], "path not found"),
        "format-cannot-hold": (base + ["--format", "llava-hf"], "cannot hold model.arch = 'minigpt4'"),
        "random-llm": (base + ["--options", "model.full_ckpt=null", f"model.projector_path={linear}"],
                       "no weight file for model.encoder_path"),
        "out-not-empty": (base, "exists and is not an empty folder"),
        "bad-metrics": (base + ["--metrics", str(linear)], "--metrics"),
        "check-not-an-export": (["--check", str(tmp_path)], "not an export folder"),
    }[case]
    if case == "out-not-empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("a user's file")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    assert not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written left behind


# ------------------------------------------------------------------------------------ the results it carries


def test_evaluate_metrics_go_into_the_card_of_the_weights_they_scored_only(tmp_path, monkeypatch, capsys):
    """evaluate.py's metrics.json records the weights it scored: an export of those weights takes its numbers, an
    export of another checkpoint with them is refused before the model is built, naming both."""
    from minigpt4.cli.evaluate import main as evaluate
    from minigpt4.models.checkpoints import save_trainable
    from minigpt4.shapes.world.scenes import build_shapes_world

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the hash cache stays inside the test
    world = tmp_path / "world"
    build_shapes_world(world, num_train=1, num_val=3, seed=5, image_size=64, cooccurrence=0.9)
    options = ["eval.tasks=[chair]", f"eval.image_dir={world}/images", f"eval.chair.images={world}/val_images.json",
               f"eval.chair.coco_annotations={world}/annotations", f"eval.chair.synonyms={world}/synonyms.txt",
               f"eval.output_dir={tmp_path}/eval", "eval.bootstrap=100", "eval.device=cpu"]
    assert evaluate(["--cfg-path", str(ROOT / "eval_configs" / "shapes_base.yaml"), "--options", *options]) == 0
    metrics = tmp_path / "eval" / "metrics.json"
    recorded = json.loads(metrics.read_text())["weights"]
    assert set(recorded) == {"model.tokenizer_path", "model.full_ckpt"}
    assert recorded["model.full_ckpt"]["file"] == "model.safetensors" and "path" not in recorded["model.full_ckpt"]

    base = ["--cfg-path", str(SHAPES_YAML), "--format", "minigpt4-pth", "--metrics", str(metrics)]
    assert cli.main(base + ["--out", str(tmp_path / "export-a")]) == 0
    card = (tmp_path / "export-a" / "README.md").read_text()
    assert "matches the SHA-256 of every weight file of this export" in card and "## Evaluation" in card

    other = tmp_path / "b.safetensors"
    save_trainable(other, {"projector.llama_proj.weight": torch.zeros(128, 128),
                           "projector.llama_proj.bias": torch.zeros(128)})
    capsys.readouterr()
    assert cli.main(base + ["--ckpt", str(other), "--out", str(tmp_path / "export-b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "describes other weights than this export" in err
    assert "model.ckpt: metrics not set, export b.safetensors (sha256 " in err
    assert not (tmp_path / "export-b").exists()


# ------------------------------------------------------------------------------------ killed in the middle

# An export that writes half its files into the staging folder, says so through the file argv[1] (written whole,
# then renamed: the test never reads it half-written) and waits there until a signal stops it.
STALLED_EXPORT = """
import os, signal, sys
from pathlib import Path
from minigpt4.export import writer

def stalled(source, formats, staging, dtype, notes):
    (staging / "model.safetensors").write_bytes(bytes(1 << 20))
    ready = Path(sys.argv[1])
    ready.with_suffix(".tmp").write_text(str(staging))
    os.replace(ready.with_suffix(".tmp"), ready)
    while True:
        signal.pause()

writer._write_formats = stalled
from minigpt4.export.cli import main
sys.exit(main(sys.argv[2:]))
"""
READY_TIMEOUT_S = 240  # the import and model build, on a loaded 2-core machine


def start_stalled_export(tmp_path: Path, out: Path) -> tuple[subprocess.Popen, Path, Path]:
    """(the export process, its staging folder, its stderr file) once the export is stalled mid-way."""
    import time

    ready, stderr = tmp_path / "ready", tmp_path / "stderr.txt"
    argv = [sys.executable, "-c", STALLED_EXPORT, str(ready), "--cfg-path", str(SHAPES_YAML), "--format",
            "minigpt4-pth", "--out", str(out)]
    with open(stderr, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():  # the readiness signal: the export's own marker file
        if proc.poll() is not None:
            pytest.fail(f"the export ended (status {proc.returncode}) before it stalled: {stderr.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"the export did not stall within {READY_TIMEOUT_S} s: {stderr.read_text()[-2000:]}")
        time.sleep(0.05)
    staging = Path(ready.read_text())
    assert staging.is_dir() and staging.parent == out.parent and (staging / "model.safetensors").is_file()
    return proc, staging, stderr


def test_sigterm_removes_the_staging_folder_and_exits_cleanly(tmp_path):
    import signal

    out = tmp_path / "exports" / "stopped"
    proc, staging, stderr = start_stalled_export(tmp_path, out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, stderr.read_text()[-2000:]
    last = stderr.read_text().strip().splitlines()[-1]
    assert last == f"stopped by SIGTERM; nothing was written to {out} (an export's staging folder is removed)"
    assert "Traceback" not in stderr.read_text()
    assert list((tmp_path / "exports").iterdir()) == []  # no staging folder, no half an export


def test_sigkill_leaves_a_staging_folder_that_the_next_export_removes(tmp_path):
    exports = tmp_path / "exports"
    proc, staging, _ = start_stalled_export(tmp_path, exports / "killed")
    proc.kill()
    proc.wait(timeout=120)
    assert staging.is_dir()  # SIGKILL cannot be handled: the folder stays until ...
    assert cli.main(["--cfg-path", str(SHAPES_YAML), "--format", "minigpt4-pth", "--out", str(exports / "next")]) == 0
    assert sorted(p.name for p in exports.iterdir()) == ["next"]  # ... the next export into that folder


def test_formats_follow_what_the_model_is():
    from omegaconf import OmegaConf

    from minigpt4.export.source import ExportError, choose_formats

    qformer = OmegaConf.create({"arch": "minigpt4", "visual_tokens": "qformer"})
    assert choose_formats(qformer, None) == ("blip2-hf", "minigpt4-pth")
    assert choose_formats(OmegaConf.create({"arch": "llava15"}), None) == ("llava-hf",)
    patches = OmegaConf.create({"arch": "minigpt4", "visual_tokens": "vit_patch4"})  # the Llama-2 variant
    assert choose_formats(patches, None) == ("minigpt4-pth",)  # its llama_proj is what the original loads
    with pytest.raises(ExportError, match="BLIP-2 has a Q-Former between the ViT and the projector"):
        choose_formats(patches, ["blip2-hf"])
    with pytest.raises(ExportError, match="2-layer MLP"):
        choose_formats(OmegaConf.create({"arch": "llava15"}), ["minigpt4-pth"])
    cnn = OmegaConf.create({"arch": "minigpt4", "visual_tokens": "cnn_grid"})  # the real-small model
    assert choose_formats(cnn, None) == ("minigpt4-pth",)
    with pytest.raises(ExportError, match="rows of a CNN's feature map"):
        choose_formats(cnn, ["blip2-hf"])


def test_image_processor_settings_take_the_eval_transform_or_refuse_another():
    from minigpt4.export.hf_parts import image_processor_settings
    from minigpt4.export.source import ExportError
    from minigpt4.processors.image import CLIP_MEAN, CLIP_STD

    vis, normalisation = image_processor_settings(None, "clip_image_eval", 28, "llava-hf processor", "CLIP tower")
    assert vis == {"name": "clip_image_eval", "image_size": 28}
    assert normalisation == {"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD)}
    own = {"name": "blip2_image_eval", "image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    assert image_processor_settings(own, "blip2_image_eval", 64, "BLIP-2 processor", "ViT") == (
        own, {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]})
    for wrong in ({"name": "clip_image_eval", "image_size": 64}, {"name": "blip2_image_eval", "image_size": 32}):
        with pytest.raises(ExportError, match=r"the BLIP-2 processor holds blip2_image_eval at the ViT's 64 px; "
                                              "export with that transform"):
            image_processor_settings(wrong, "blip2_image_eval", 64, "BLIP-2 processor", "ViT")
