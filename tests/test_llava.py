"""LLaVA-1.5 with the VIB projector on tiny random models: freezing, S-sample order, prompt slots, projector
loading (original release and llava-hf), the 336-px padded processors, 7B meta counts, evaluate.py end to end
and a 2-process training run."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _model_checks import assert_sample_major_pairing, toy_batch
from PIL import Image
from safetensors.torch import load_file

from minigpt4.common.tiny_models import TINY_LLM
from minigpt4.models.checkpoints import CheckpointError, load_trainable, save_trainable, trainable_tensors

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                 patch_size=14)
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the human's questions.")


def tiny_llava_config(tokenizer_dir: str | None, projector: str = "vib", **overrides) -> dict:
    cfg = dict(arch="llava15", tokenizer_path=tokenizer_dir, vision=dict(TINY_CLIP), llm=dict(TINY_LLM),
               mm_projector_type=projector, prompt_template="llava15", llm_dtype="fp32", encoder_dtype="fp32",
               max_txt_len=64, vib=dict(num_samples=3, beta=1e-2, adaptive=True))
    cfg.update(overrides)
    return cfg


@pytest.fixture
def make_llava(tiny_tokenizer_dir):
    from minigpt4.models.from_config import build_model

    def make(projector: str = "vib", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return build_model(tiny_llava_config(tiny_tokenizer_dir, projector, **overrides))

    return make


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny llava-hf folder (save_pretrained of LlavaForConditionalGeneration + the tokenizer)."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from minigpt4.common.config import ModelConfig, merge
    from minigpt4.models.llava import llava_config_from

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(7)
    config = llava_config_from(merge(ModelConfig, tiny_llava_config(tiny_tokenizer_dir)), tokenizer)
    folder = tmp_path_factory.mktemp("tiny_llava_hf")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---- the model ---------------------------------------------------------------------------------------------------


def test_vib_forward_backward_trains_only_the_projector(make_llava):
    model = make_llava("vib").train()
    assert model.num_query_tokens == 4 and model.encoder.out_dim == 32  # (28/14)² patches, CLS dropped
    assert not model.llm.training and not model.encoder.training and model.projector.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"projector.{n}" for n in (
        "mu_p", "std_p", *(f"{head}.linear_{i}.{t}" for head in ("llama_proj", "llama_proj_std")
                           for i in (1, 2) for t in ("weight", "bias")))}
    out = model(toy_batch())
    out["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert torch.allclose(out["loss"], out["ce"] + out["kl_term"]) and out["kl_term"] > 0
    assert set(trainable_tensors(model)) == trainable
    std_linear = make_llava("vib", vib=dict(std_head="linear")).projector.llama_proj_std
    assert isinstance(std_linear, torch.nn.Linear) and std_linear.weight.shape == (64, 32)


def test_sample_s_of_image_b_meets_text_of_image_b(make_llava):
    model = make_llava("vib").train()
    with torch.no_grad():  # σ ≈ 0: every noisy sample equals its image's μ and can be recognised
        model.projector.llama_proj_std.linear_2.weight.zero_()
        model.projector.llama_proj_std.linear_2.bias.fill_(-30.0)
    assert_sample_major_pairing(model)


def test_llava_prompt_puts_a_newline_after_the_image_and_ends_with_eos(make_llava):
    model = make_llava("linear")
    tok, n = model.tokenizer, model.num_query_tokens
    ids = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    assert model.end_sym == "</s>" and model.template.prompt("Hi?") == "USER: <ImageHere>\nHi? ASSISTANT:"
    text = model.build_training_text(["Describe this image.", None], ["a red ball", "two cats"])
    before = [tok.bos_token_id] + ids("USER: ")
    rows = [(ids("\nDescribe this image. ASSISTANT:"), ids("a red ball</s>")), (ids("\n"), ids("two cats</s>"))]
    for i, (after, target) in enumerate(rows):
        length = len(before) + n + len(after) + len(target)
        assert text.input_ids[i, :length].tolist() == before + [tok.pad_token_id] * n + after + target
        assert text.labels[i, :length].tolist() == [-100] * (length - len(target)) + target
        assert target[-1] == tok.eos_token_id
    # The image slots are 4 CLIP patches wide; the eval prompt format gives the same split.
    gen = model.build_generation_text([f"{LLAVA_SYSTEM} USER: <ImageHere>\nIs there a dog? ASSISTANT:"])
    assert gen.image_mask.sum().item() == n
    assert model.entropy_vocab_size == model.llm.get_input_embeddings().weight.shape[0]  # tiny: no padding rows


def test_entropy_ignores_embedding_rows_past_the_tokenizer_vocabulary(make_llava):
    # llava-hf pads the embeddings (32,000 tokens -> 32,064 rows); the similarity softmax must not see the padding.
    model = make_llava("vib", llm={**TINY_LLM, "vocab_size": 448}).train()
    vocab = model.tokenizer.vocab_size
    assert model.llm.get_input_embeddings().weight.shape[0] == 448 and model.embed_weight.shape[0] == vocab < 448
    seen = {}
    original = model.projector.forward

    def spy(q, **kwargs):
        seen["rows"] = kwargs["embed_weight"].shape[0]
        return original(q, **kwargs)

    model.projector.forward = spy
    model(toy_batch())
    assert seen["rows"] == vocab


def test_batched_generation_equals_batch_one(make_llava):
    model = make_llava("vib").eval()
    prompts = [f"{LLAVA_SYSTEM} USER: <ImageHere>\nDescribe this image. ASSISTANT:",
               "USER: <ImageHere>\nIs there a dog in the image? ASSISTANT:"]
    images = toy_batch()["image"]
    batched = model.generate(prompts, images, max_new_tokens=6)
    assert batched == [model.generate([p], images[i: i + 1], max_new_tokens=6)[0] for i, p in enumerate(prompts)]


# ---- loading -----------------------------------------------------------------------------------------------------


def test_llava_hf_folder_loads_whole_model_and_its_projector(llava_dir, make_llava, tiny_tokenizer_dir):
    from minigpt4.models.from_config import build_model

    saved = load_file(llava_dir / "model.safetensors")
    model = build_model(dict(arch="llava15", llava_path=str(llava_dir), mm_projector_type="vib",
                             prompt_template="llava15", llm_dtype="fp32"))
    mean = model.projector.llama_proj
    assert torch.equal(mean.linear_2.weight, saved["multi_modal_projector.linear_2.weight"])
    assert torch.equal(model.llm.lm_head.weight, saved["language_model.lm_head.weight"])
    assert mean.linear_1.weight.dtype == torch.float32 and model.num_query_tokens == 4
    # The folder as a projector source for another (random) model: only the μ head changes.
    other = make_llava("vib", seed=1, projector_path=str(llava_dir))
    assert torch.equal(other.projector.llama_proj.linear_1.bias, saved["multi_modal_projector.linear_1.bias"])
    assert not torch.equal(other.llm.lm_head.weight, saved["language_model.lm_head.weight"])


def test_original_release_mm_projector_bin_loads_into_the_mean_head(tmp_path, make_llava):
    g = torch.Generator().manual_seed(3)
    release = {"model.mm_projector.0.weight": torch.randn(64, 32, generator=g), "model.mm_projector.0.bias":
               torch.randn(64, generator=g), "model.mm_projector.2.weight": torch.randn(64, 64, generator=g),
               "model.mm_projector.2.bias": torch.randn(64, generator=g)}
    torch.save(release, tmp_path / "mm_projector.bin")
    for projector in ("linear", "vib"):
        mean = make_llava(projector, projector_path=str(tmp_path / "mm_projector.bin")).projector.llama_proj
        assert torch.equal(mean.linear_1.weight, release["model.mm_projector.0.weight"])
        assert torch.equal(mean.linear_2.bias, release["model.mm_projector.2.bias"])
    folder_form = make_llava("linear", projector_path=str(tmp_path)).projector.llama_proj  # a folder holding it
    assert torch.equal(folder_form.linear_2.weight, release["model.mm_projector.2.weight"])


@pytest.mark.parametrize("tensors, message", [
    ({"0.weight": (4096, 32), "0.bias": (4096,), "2.weight": (4096, 8), "2.bias": (4096,)},
     r"4096-wide: this is a 7B .*the LLM is 64-wide \(unknown size\)"),
    ({"0.weight": (64, 48), "0.bias": (64,), "2.weight": (64, 64), "2.bias": (64,)},
     r"48-wide inputs but the vision tower outputs 32-wide"),
    ({"weight": (64, 32), "bias": (64,)}, r"single-Linear mm_projector"),
    ({"0.weight": (64, 32), "0.bias": (64,), "2.weight": (64, 64), "2.bias": (64,), "3.weight": (1,)},
     r"not a LLaVA-1.5 projector"),
])
def test_wrong_projector_files_fail_with_clear_errors(tmp_path, make_llava, tensors, message):
    torch.save({f"model.mm_projector.{k}": torch.zeros(shape) for k, shape in tensors.items()}, tmp_path / "p.bin")
    with pytest.raises(CheckpointError, match=message):
        make_llava("vib", projector_path=str(tmp_path / "p.bin"))


def test_llava_folder_with_a_missing_tensor_is_refused(llava_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from minigpt4.models.from_config import build_model

    broken = tmp_path / "broken"
    shutil.copytree(llava_dir, broken)
    state = load_file(broken / "model.safetensors")
    del state["multi_modal_projector.linear_1.bias"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="multi_modal_projector.linear_1.bias"):
        build_model(dict(arch="llava15", llava_path=str(broken), prompt_template="llava15", llm_dtype="fp32"))
    (tmp_path / "notllava").mkdir()
    (tmp_path / "notllava" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="expected 'llava'"):
        build_model(dict(arch="llava15", llava_path=str(tmp_path / "notllava"), tokenizer_path=str(llava_dir)))


def test_config_refuses_weights_the_architecture_never_reads(llava_dir):
    from minigpt4.common.config import ConfigError, ModelConfig, merge, validate_model_config

    with pytest.raises(ConfigError, match="model.encoder_path is not used by model.arch = 'llava15'"):
        validate_model_config(merge(ModelConfig, dict(arch="llava15", encoder_path="x")), check_files=False)
    with pytest.raises(ConfigError, match="model.llava_path is not used by model.arch = 'minigpt4'"):
        validate_model_config(merge(ModelConfig, dict(llava_path=str(llava_dir))), check_files=False)


# ---- processors and sizes -----------------------------------------------------------------------------------------


def test_clip_processors_pad_to_square_with_the_mean_colour():
    from minigpt4.processors.image import CLIP_MEAN, CLIP_STD, build_image_processor

    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    out = build_image_processor({"name": "clip_image_eval", "image_size": 28})(wide)
    assert out.shape == (3, 28, 28)
    fill = torch.tensor([(c / 255 - m) / s for c, m, s in zip((122, 116, 104), CLIP_MEAN, CLIP_STD)])
    red = torch.tensor([(c / 255 - m) / s for c, m, s in zip((255, 0, 0), CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(out[:, 0, 14], fill, atol=1e-5) and torch.allclose(out[:, 27, 3], fill, atol=1e-5)
    assert torch.allclose(out[:, 14, 14], red, atol=1e-5)
    assert build_image_processor({"name": "clip_image_eval"}).image_size == 336
    train = build_image_processor({"name": "clip_image_train", "image_size": 28, "seed": 1})
    crops = [train(wide) for _ in range(2)]
    assert crops[0].shape == (3, 28, 28) and not torch.equal(crops[0], crops[1])
    assert torch.equal(build_image_processor({"name": "clip_image_train", "image_size": 28, "seed": 1})(wide), crops[0])


def _model_summary(cfg: str, *options: str) -> dict:
    spec = importlib.util.spec_from_file_location("model_summary", ROOT / "scripts" / "model_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from omegaconf import OmegaConf

    from minigpt4.common.config import ModelConfig, merge
    from minigpt4.models.from_config import build_model

    raw = OmegaConf.load(ROOT / cfg)["model"]
    model_cfg = merge(ModelConfig, raw, options=list(options), allow_missing=True)
    return module.summarize(build_model(model_cfg, device="meta"))


def test_7b_llava_projector_counts_on_meta():
    linear_mlp = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert linear_mlp == 20_979_712
    vib = _model_summary("train_configs/adavib_llava15_7b.yaml")
    assert vib["projector_trainable"] == vib["trainable"] == 2 * 20_979_712 + 2 * 4096
    assert vib["vision"] == 303_507_456 and vib["llm_trainable"] == 0  # CLIP ViT-L/14-336
    assert _model_summary("train_configs/linear_ce_llava15_7b.yaml")["projector_trainable"] == 20_979_712
    std_linear = _model_summary("train_configs/adavib_llava15_7b.yaml", "vib.std_head=linear")
    assert std_linear["projector_trainable"] == 20_979_712 + 1024 * 4096 + 4096 + 2 * 4096


# ---- evaluate.py and train.py end to end ---------------------------------------------------------------------------


def _write_images(folder: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (30, 44, 3), dtype=np.uint8)).save(folder / name)


def test_evaluate_pope_and_chair_with_a_trained_projector(tmp_path, llava_dir, monkeypatch):
    import yaml

    import evaluate
    from minigpt4.eval.benchmark_runs import ImageLoader
    from minigpt4.eval.settings import EvalSettings
    from minigpt4.models.from_config import build_model
    from minigpt4.models.llava import Llava15

    monkeypatch.setenv("HOME", str(tmp_path))  # CHAIR GT cache goes under ~/.cache
    names = [f"COCO_val2014_{i:012d}.jpg" for i in range(1, 4)]
    _write_images(tmp_path / "val2014", names)
    (tmp_path / "pope").mkdir()
    with open(tmp_path / "pope" / "random.jsonl", "w") as f:
        for qid, (name, obj, label) in enumerate([(names[0], "dog", "yes"), (names[1], "chair", "no"),
                                                  (names[2], "dog", "no"), (names[0], "person", "yes")]):
            f.write(json.dumps({"question_id": qid, "image": name, "text": f"Is there a {obj} in the image?",
                                "label": label}) + "\n")
    (tmp_path / "ann").mkdir()
    imgs = [{"id": i, "file_name": n} for i, n in enumerate(names, start=1)]
    (tmp_path / "ann" / "instances_val2014.json").write_text(json.dumps(
        {"images": imgs, "categories": [{"id": 18, "name": "dog"}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 18}]}))
    (tmp_path / "ann" / "captions_val2014.json").write_text(json.dumps(
        {"images": imgs, "annotations": [{"id": i, "image_id": i, "caption": "a dog"} for i in (1, 2, 3)]}))
    # A "fine-tuned" projector: the loaded model's, perturbed, saved as trainable tensors. Its visual tokens differ
    # from the folder's own projector's for every image; the tiny random LLM gives the same greedy answers with
    # either, so the tokens evaluate.py projects are what shows which projector it used.
    model_cfg = dict(arch="llava15", llava_path=str(llava_dir), mm_projector_type="vib", prompt_template="llava15",
                     llm_dtype="fp32")
    trained = build_model(model_cfg)
    loader = ImageLoader(EvalSettings(vis_processor={"name": "clip_image_eval", "image_size": 28}))
    pixels = torch.stack([loader(str(tmp_path / "val2014" / name)) for name in names])
    with torch.no_grad():
        features = trained.encode_images(pixels)
        own_tokens = trained.generation_visual_tokens(features)
        trained.projector.llama_proj.linear_2.bias.add_(0.5)
        tuned_tokens = trained.generation_visual_tokens(features)
    assert (tuned_tokens - own_tokens).abs().min() > 0.4
    save_trainable(tmp_path / "trainable.safetensors", trainable_tensors(trained))
    projected = []  # every image's visual tokens as evaluate.py's model projects them

    def record_projection(model, image_features):
        tokens = real_projection(model, image_features)
        projected.extend(tokens.detach().clone())
        return tokens

    real_projection = Llava15.generation_visual_tokens
    monkeypatch.setattr(Llava15, "generation_visual_tokens", record_projection)
    cfg = {"model": {**model_cfg, "ckpt": str(tmp_path / "trainable.safetensors")},
           "eval": {"tasks": ["pope", "chair"], "output_dir": str(tmp_path / "out"), "name": "tiny-llava",
                    "image_dir": str(tmp_path / "val2014"), "batch_size": 3, "device": "cpu", "bootstrap": 20,
                    "system": LLAVA_SYSTEM, "prompt_format": "{system} USER: <ImageHere>\n{question} ASSISTANT:",
                    "vis_processor": {"name": "clip_image_eval", "image_size": 28},
                    "pope": {"dir": str(tmp_path / "pope"), "splits": ["random"], "max_new_tokens": 3},
                    "chair": {"coco_annotations": str(tmp_path / "ann"), "num_images": 3, "max_new_tokens": 5}}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    assert evaluate.main(["--cfg-path", str(tmp_path / "eval.yaml")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["projector"].startswith("adavib")
    assert metrics["pope"]["split"] == "random" and {"accuracy", "f1", "yes_ratio"} <= set(metrics["pope"])
    assert {"chair_s", "chair_i", "recall", "mean_length"} <= set(metrics["chair"])
    answers = [json.loads(x) for x in (tmp_path / "out" / "pope_random_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and answers[0]["prompt"].startswith(LLAVA_SYSTEM + " USER: <ImageHere>\nIs there")
    # The answers are those of the fine-tuned projector, not of the folder's own: every visual token evaluate.py
    # fed the LLM is the fine-tuned projector's for one of the images, and none is the folder projector's.
    assert projected, "evaluate.py never projected visual tokens through generation_visual_tokens"
    for tokens in projected:
        assert any(torch.allclose(tokens, tuned, atol=1e-5) for tuned in tuned_tokens), "not the tuned projection"
        assert not any(torch.allclose(tokens, own, atol=0.1) for own in own_tokens), "the folder's own projector"
    trained.eval()
    first = answers[0]
    image = pixels[names.index(first["image"])].unsqueeze(0)
    assert trained.generate([first["prompt"]], image, max_new_tokens=3) == [first["answer"]]
    # The POPE numbers are those of the answers written (the reference rule, recomputed by hand: "no" when a word,
    # after dropping "." and ",", is No, no, not or NO, or ends in n't).
    assert metrics["pope"]["rule"] == "reference"
    labels = {0: "yes", 1: "no", 2: "no", 3: "yes"}
    said_yes = {a["question_id"]: not any(w in ("No", "no", "not", "NO") or w.endswith("n't") for w in
                                          a["answer"].strip().replace(".", "").replace(",", "").split(" "))
                for a in answers}
    assert metrics["pope"]["accuracy"] == pytest.approx(
        sum(said_yes[qid] == (label == "yes") for qid, label in labels.items()) / 4)
    assert metrics["pope"]["yes_ratio"] == pytest.approx(sum(said_yes.values()) / 4)
    assert len((tmp_path / "out" / "chair_captions.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_two_process_training_run_saves_only_the_projector(tmp_path, llava_dir):
    import yaml

    from minigpt4.models.from_config import build_model

    ids = [9, 25, 30, 42, 57, 61, 72, 88]
    _write_images(tmp_path / "train2014", [f"{i:012d}.jpg" for i in ids])
    captions = ["a dog on the grass", "two cats sleeping on a sofa", "a man riding a bike", "a red ball"]
    (tmp_path / "captions.json").write_text(json.dumps(
        [{"image_id": i, "caption": captions[k % 4]} for k, i in enumerate(ids)]))
    recipe = yaml.safe_load((ROOT / "train_configs" / "adavib_llava15_7b.yaml").read_text())
    recipe["model"].update(llava_path=str(llava_dir), llm_preset=None, llm_dtype="fp32", encoder_dtype="fp32")
    recipe["datasets"]["caption_json"].update(ann_path=str(tmp_path / "captions.json"),
                                              image_dir=str(tmp_path / "train2014"))
    recipe["datasets"]["caption_json"]["vis_processor"]["image_size"] = 28
    recipe["run"].update(output_dir=str(tmp_path / "out"), device="cpu", batch_size=1, grad_accum_steps=1,
                         amp="none", num_workers=0, iters_per_epoch=2, init_lr=1e-2, log_every=1, progress_bar=False,
                         save_every_steps=None)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train.py"), "--cfg-path", str(tmp_path / "train.yaml")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    final = load_file(tmp_path / "out" / "final" / "trainable.safetensors")
    fresh = build_model(recipe["model"])
    assert set(final) == set(trainable_tensors(fresh))
    assert not torch.equal(final["projector.llama_proj.linear_1.weight"],
                           fresh.projector.llama_proj.linear_1.weight)  # the μ head did train
    load_trainable(fresh, tmp_path / "out" / "final" / "trainable.safetensors")  # and loads back strictly
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(m["loss"]) for m in metrics)


def test_llava_projector_init_does_not_depend_on_the_llm_depth(make_llava):
    """As for MiniGPT-4 (test_model.py): the projector draws from the RNG state the build started in."""
    shallow = make_llava("vib", seed=5)
    deeper = make_llava("vib", seed=5, llm={**TINY_LLM, "num_hidden_layers": 3})
    fresh = [name for name in shallow.projector.state_dict() if not name.startswith("llama_proj.")]
    assert fresh, "the VIB projector has fresh tensors beside LLaVA's own MLP (the μ head)"
    for name in fresh:  # the μ head is LLaVA's own MLP, drawn with the model
        assert torch.equal(shallow.projector.state_dict()[name], deeper.projector.state_dict()[name]), name
