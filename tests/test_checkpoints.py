"""Weight loading: LAVIS conversion checked against an independent functional forward, HF snapshots,
the converted-file script, MiniGPT-4 projectors, own checkpoints, and every refusal path."""
from __future__ import annotations

import json
import math
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _scripts import load_script
from safetensors.torch import save_file

from minigpt4.models import checkpoints as ckpt
from minigpt4.models import released_weights
from minigpt4.models.checkpoints import CheckpointError
from minigpt4.models.encoders import ImageEncoder

convert_lavis_checkpoint = load_script("convert_lavis_checkpoint")

# Tiny EVA ViT (3 blocks used + 1 extra in the file, as the real file has 40 for 39) and Q-Former.
WIDTH, BLOCKS, HEADS, MLP, IMAGE, PATCH = 32, 3, 2, 48, 28, 14
Q_WIDTH, Q_LAYERS, Q_HEADS, Q_MLP, N_QUERY = 16, 2, 2, 40, 4
VISION = dict(hidden_size=WIDTH, num_hidden_layers=BLOCKS, num_attention_heads=HEADS, intermediate_size=MLP,
              image_size=IMAGE, patch_size=PATCH)
QFORMER = dict(hidden_size=Q_WIDTH, num_hidden_layers=Q_LAYERS, num_attention_heads=Q_HEADS,
               intermediate_size=Q_MLP)


def new_encoder(**vision_extra) -> ImageEncoder:
    return ImageEncoder({**VISION, **vision_extra}, QFORMER, num_query_tokens=N_QUERY)


# ---------------------------------------------------------------------------- LAVIS-layout files + reference


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if "norm" in key.lower() and key.endswith("weight"):
            state[key] = 1.0 + 0.1 * noise  # LayerNorm gains near 1
        elif key.endswith(("bias", "_bias")):
            state[key] = 0.1 * noise
        else:
            state[key] = noise / math.sqrt(shape[-1] if len(shape) > 1 else 1)
    return state


def lavis_vit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """LAVIS eva_vit_g.pth key names, with one block more than the model uses, plus EVA's unused final norm."""
    shapes = {
        "cls_token": (1, 1, WIDTH),
        "pos_embed": (1, (IMAGE // PATCH) ** 2 + 1, WIDTH),
        "patch_embed.proj.weight": (WIDTH, 3, PATCH, PATCH),
        "patch_embed.proj.bias": (WIDTH,),
        "norm.weight": (WIDTH,),
        "norm.bias": (WIDTH,),
    }
    for i in range(BLOCKS + 1):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (WIDTH,), b + "norm1.bias": (WIDTH,),
            b + "attn.qkv.weight": (3 * WIDTH, WIDTH), b + "attn.q_bias": (WIDTH,), b + "attn.v_bias": (WIDTH,),
            b + "attn.proj.weight": (WIDTH, WIDTH), b + "attn.proj.bias": (WIDTH,),
            b + "norm2.weight": (WIDTH,), b + "norm2.bias": (WIDTH,),
            b + "mlp.fc1.weight": (MLP, WIDTH), b + "mlp.fc1.bias": (MLP,),
            b + "mlp.fc2.weight": (WIDTH, MLP), b + "mlp.fc2.bias": (WIDTH,),
        })
    return _random_state(shapes, seed)


def lavis_blip2_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """LAVIS blip2_pretrained_*.pth key names, text branch and T5 projection included (unused)."""
    bert = "Qformer.bert."
    shapes = {
        "query_tokens": (1, N_QUERY, Q_WIDTH),
        "ln_vision.weight": (WIDTH,), "ln_vision.bias": (WIDTH,),
        bert + "embeddings.LayerNorm.weight": (Q_WIDTH,), bert + "embeddings.LayerNorm.bias": (Q_WIDTH,),
        bert + "embeddings.word_embeddings.weight": (30, Q_WIDTH),
        bert + "embeddings.position_embeddings.weight": (8, Q_WIDTH),
        "Qformer.cls.predictions.bias": (30,),
        "Qformer.cls.predictions.transform.dense.weight": (Q_WIDTH, Q_WIDTH),
        "t5_proj.weight": (24, Q_WIDTH), "t5_proj.bias": (24,),
    }

    def attention(prefix: str, kv_width: int) -> None:
        for name, in_width in (("query", Q_WIDTH), ("key", kv_width), ("value", kv_width)):
            shapes[f"{prefix}.self.{name}.weight"] = (Q_WIDTH, in_width)
            shapes[f"{prefix}.self.{name}.bias"] = (Q_WIDTH,)
        shapes[f"{prefix}.output.dense.weight"] = (Q_WIDTH, Q_WIDTH)
        shapes[f"{prefix}.output.dense.bias"] = (Q_WIDTH,)
        shapes[f"{prefix}.output.LayerNorm.weight"] = (Q_WIDTH,)
        shapes[f"{prefix}.output.LayerNorm.bias"] = (Q_WIDTH,)

    for i in range(Q_LAYERS):
        layer = f"{bert}encoder.layer.{i}."
        attention(layer + "attention", Q_WIDTH)
        if i % 2 == 0:
            attention(layer + "crossattention", WIDTH)
        for branch in ("", "_query"):
            shapes[f"{layer}intermediate{branch}.dense.weight"] = (Q_MLP, Q_WIDTH)
            shapes[f"{layer}intermediate{branch}.dense.bias"] = (Q_MLP,)
            shapes[f"{layer}output{branch}.dense.weight"] = (Q_WIDTH, Q_MLP)
            shapes[f"{layer}output{branch}.dense.bias"] = (Q_WIDTH,)
            shapes[f"{layer}output{branch}.LayerNorm.weight"] = (Q_WIDTH,)
            shapes[f"{layer}output{branch}.LayerNorm.bias"] = (Q_WIDTH,)
    state = _random_state(shapes, seed)
    state[bert + "embeddings.position_ids"] = torch.arange(8).unsqueeze(0)
    return state


def _attention(q_in, kv_in, w, prefix, heads):
    """Multi-head attention from raw LAVIS-named weights: softmax(q k^T / sqrt(d)) v."""
    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
    q = split(F.linear(q_in, w[prefix + "query.weight"], w[prefix + "query.bias"]))
    k = split(F.linear(kv_in, w[prefix + "key.weight"], w[prefix + "key.bias"]))
    v = split(F.linear(kv_in, w[prefix + "value.weight"], w[prefix + "value.bias"]))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
    return att.transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], -1)


def reference_forward(vit: dict, blip2: dict, pixels: torch.Tensor) -> torch.Tensor:
    """EVA ViT (first BLIP-2-used blocks) -> ln_vision -> Q-Former query branch, written with F only."""
    batch = pixels.shape[0]
    x = F.conv2d(pixels, vit["patch_embed.proj.weight"], vit["patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([vit["cls_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + vit["pos_embed"]
    for i in range(BLOCKS):  # the file's extra last block is not used
        p = f"blocks.{i}."
        h = F.layer_norm(x, (WIDTH,), vit[p + "norm1.weight"], vit[p + "norm1.bias"], 1e-6)
        bias = torch.cat([vit[p + "attn.q_bias"], torch.zeros(WIDTH), vit[p + "attn.v_bias"]])
        qkv = F.linear(h, vit[p + "attn.qkv.weight"], bias).view(batch, -1, 3, HEADS, WIDTH // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * (WIDTH // HEADS) ** -0.5, dim=-1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(batch, -1, WIDTH), vit[p + "attn.proj.weight"],
                         vit[p + "attn.proj.bias"])
        h = F.layer_norm(x, (WIDTH,), vit[p + "norm2.weight"], vit[p + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, vit[p + "mlp.fc1.weight"], vit[p + "mlp.fc1.bias"])),
                     vit[p + "mlp.fc2.weight"], vit[p + "mlp.fc2.bias"])
        x = x + h
    image = F.layer_norm(x, (WIDTH,), blip2["ln_vision.weight"], blip2["ln_vision.bias"], 1e-5)

    bert = "Qformer.bert."
    def add_norm(out, residual, prefix):  # BERT post-LN: LayerNorm(dense(out) + residual)
        out = F.linear(out, blip2[prefix + "dense.weight"], blip2[prefix + "dense.bias"])
        return F.layer_norm(out + residual, (Q_WIDTH,), blip2[prefix + "LayerNorm.weight"],
                            blip2[prefix + "LayerNorm.bias"], 1e-12)

    q = F.layer_norm(blip2["query_tokens"].expand(batch, -1, -1), (Q_WIDTH,),
                     blip2[bert + "embeddings.LayerNorm.weight"], blip2[bert + "embeddings.LayerNorm.bias"], 1e-12)
    for i in range(Q_LAYERS):
        layer = f"{bert}encoder.layer.{i}."
        q = add_norm(_attention(q, q, blip2, layer + "attention.self.", Q_HEADS), q, layer + "attention.output.")
        if i % 2 == 0:
            q = add_norm(_attention(q, image, blip2, layer + "crossattention.self.", Q_HEADS), q,
                         layer + "crossattention.output.")
        hidden = F.gelu(F.linear(q, blip2[layer + "intermediate_query.dense.weight"],
                                 blip2[layer + "intermediate_query.dense.bias"]))
        q = add_norm(hidden, q, layer + "output_query.")
    return q


@pytest.fixture
def lavis_files(tmp_path):
    vit, blip2 = lavis_vit_state(), lavis_blip2_state()
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    torch.save({"model": blip2, "epoch": 3}, tmp_path / "blip2_pretrained_flant5xxl.pth")
    return tmp_path / "eva_vit_g.pth", tmp_path / "blip2_pretrained_flant5xxl.pth", vit, blip2


PIXELS = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_lavis_checkpoints_load_and_match_functional_reference(lavis_files, attn):
    vit_path, blip2_path, vit, blip2 = lavis_files
    encoder = new_encoder(attn_implementation=attn)
    released_weights.load_lavis_encoder(encoder, vit_path, blip2_path)
    expected = reference_forward(vit, blip2, PIXELS)
    with torch.no_grad():
        torch.testing.assert_close(encoder(PIXELS), expected, atol=1e-5, rtol=0)


def test_visual_encoder_inside_blip2_file_is_converted_too(tmp_path, lavis_files):
    _, _, vit, blip2 = lavis_files
    combined = {**blip2, **{f"visual_encoder.{k}": v for k, v in vit.items()}}
    torch.save({"model": combined}, tmp_path / "blip2_with_vit.pth")
    encoder = new_encoder()
    released_weights.load_lavis_encoder(encoder, None, tmp_path / "blip2_with_vit.pth")
    with torch.no_grad():
        torch.testing.assert_close(encoder(PIXELS), reference_forward(vit, blip2, PIXELS), atol=1e-5, rtol=0)


def test_unknown_lavis_keys_are_errors():
    vit = lavis_vit_state()
    vit["blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, HEADS)
    with pytest.raises(CheckpointError, match="relative_position_bias_table"):
        released_weights.convert_lavis_vit(vit, num_blocks=BLOCKS)
    blip2 = lavis_blip2_state()
    blip2["Qformer.bert.encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match="distance_embedding"):
        released_weights.convert_lavis_qformer(blip2)


def test_converted_file_round_trip_through_script(tmp_path, lavis_files, capsys):
    vit_path, blip2_path, vit, blip2 = lavis_files
    out = tmp_path / "encoder.safetensors"
    rc = convert_lavis_checkpoint.main([
        "--vit", str(vit_path), "--qformer", str(blip2_path), "--out", str(out),
        "--num-query-tokens", str(N_QUERY), "--vision-config", json.dumps(VISION),
        "--qformer-config", json.dumps(QFORMER),
    ])
    assert rc == 0 and out.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    encoder = new_encoder()
    released_weights.load_encoder_weights(encoder, out)
    with torch.no_grad():
        torch.testing.assert_close(encoder(PIXELS), reference_forward(vit, blip2, PIXELS), atol=1e-5, rtol=0)
    # A raw LAVIS file is not a converted file: say what to do.
    with pytest.raises(CheckpointError, match="convert_lavis_checkpoint"):
        released_weights.load_encoder_weights(encoder, vit_path)
    # The script's strict check against full-size presets rejects the tiny files, naming the problem.
    rc = convert_lavis_checkpoint.main(["--vit", str(vit_path), "--qformer", str(blip2_path),
                                        "--out", str(tmp_path / "full.safetensors")])
    assert rc == 1 and "shape mismatch" in capsys.readouterr().err
    assert not (tmp_path / "full.safetensors").exists()


# ------------------------------------------------------------------------------------- HF BLIP-2 snapshot


def _save_hf_snapshot(folder: Path, vision_layers: int = BLOCKS):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config(
        vision_config={**VISION, "num_hidden_layers": vision_layers, "layer_norm_eps": 1e-5},
        qformer_config=QFORMER,
        text_config=dict(model_type="opt", vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                         num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16),
        num_query_tokens=N_QUERY,
    )
    torch.manual_seed(3)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial values everywhere (HF initialises some tensors to 0/1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder, max_shard_size="40KB")  # force several shards + index
    return model


def test_hf_snapshot_loads_and_matches_hf_computation(tmp_path):
    hf = _save_hf_snapshot(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    encoder = new_encoder(layer_norm_eps=1e-5)  # the tiny HF model uses one eps for blocks and final norm
    released_weights.load_hf_blip2_snapshot(encoder, tmp_path)
    torch.testing.assert_close(encoder.ln_vision.weight, hf.vision_model.post_layernorm.weight, atol=0, rtol=0)
    with torch.no_grad():
        image = hf.vision_model(pixel_values=PIXELS).last_hidden_state
        expected = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1),
                              encoder_hidden_states=image).last_hidden_state
        torch.testing.assert_close(encoder(PIXELS), expected, atol=1e-5, rtol=0)


def test_hf_snapshot_with_other_vit_depth_is_refused(tmp_path):
    _save_hf_snapshot(tmp_path, vision_layers=BLOCKS + 1)
    with pytest.raises(CheckpointError, match="vision_config.num_hidden_layers: snapshot 4, model 3"):
        released_weights.load_hf_blip2_snapshot(new_encoder(), tmp_path)


# -------------------------------------------------------------------------------- strict-loading errors


def test_missing_and_unexpected_keys_are_named(lavis_files):
    _, _, vit, blip2 = lavis_files
    state = {**released_weights.convert_lavis_vit(vit, num_blocks=BLOCKS),
             **released_weights.convert_lavis_qformer(blip2)}
    encoder = new_encoder()
    broken = dict(state)
    del broken["vision_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"(?s)my encoder.*somefile.*1 missing key.*layers\.1\.mlp\.fc2\.bias"):
        ckpt.load_strict(encoder, broken, what="my encoder", source="somefile")
    extra = {**state, "qformer.encoder.layer.0.attention.attention.rotary.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"1 unexpected key.*rotary"):
        ckpt.load_strict(encoder, extra, what="my encoder", source="somefile")
    wrong = {**state, "query_tokens": torch.zeros(1, N_QUERY + 1, Q_WIDTH)}
    with pytest.raises(CheckpointError, match=r"shape mismatch.*query_tokens: checkpoint \(1, 5, 16\) vs model"):
        ckpt.load_strict(encoder, wrong, what="my encoder", source="somefile")
    ckpt.load_strict(encoder, state, what="my encoder", source="somefile")  # the intact dict loads


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nowhere.pth"):
        ckpt.load_state_file(tmp_path / "nowhere.pth")


class _RunsShellOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_code_executing_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "executed"
    payload = {"model": {"w": torch.zeros(2), "evil": _RunsShellOnUnpickle(marker)}}
    # The payload is live: plain unpickling would run it.
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
    marker.unlink()
    torch.save(payload, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        ckpt.load_state_file(tmp_path / "evil.pth")
    assert not marker.exists()


def test_non_finite_values_are_refused(tmp_path):
    bad = torch.ones(4)
    bad[2] = float("nan")
    save_file({"fine": torch.ones(3), "broken.weight": bad}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="broken.weight.*NaN or inf"):
        ckpt.load_state_file(tmp_path / "nan.safetensors")
    torch.save({"model": {"w": torch.tensor([1.0, float("inf")])}}, tmp_path / "inf.pth")
    with pytest.raises(CheckpointError, match="'w'"):
        ckpt.load_state_file(tmp_path / "inf.pth")


# ------------------------------------------------------------------------------------ MiniGPT-4 projector


def test_minigpt4_projector_loads(tmp_path):
    weight, bias = torch.randn(4096, Q_WIDTH), torch.randn(4096)
    torch.save({"model": {"llama_proj.weight": weight, "llama_proj.bias": bias}}, tmp_path / "proj.pth")
    linear = torch.nn.Linear(Q_WIDTH, 4096)
    released_weights.load_minigpt4_projector(linear, tmp_path / "proj.pth", llm_hidden=4096)
    assert torch.equal(linear.weight, weight) and torch.equal(linear.bias, bias)


def test_13b_projector_into_7b_llm_is_explained(tmp_path):
    torch.save({"model": {"llama_proj.weight": torch.zeros(5120, Q_WIDTH), "llama_proj.bias": torch.zeros(5120)}},
               tmp_path / "proj13b.pth")
    with pytest.raises(CheckpointError) as info:
        released_weights.load_minigpt4_projector(torch.nn.Linear(Q_WIDTH, 4096), tmp_path / "proj13b.pth",
                                                 llm_hidden=4096)
    message = str(info.value)
    assert "projector is 5120-wide: this is a 13B" in message and "the LLM is 4096-wide (7B)" in message
    assert "6656" in message and "8192" in message  # the table of known widths


def test_projector_errors_for_wrong_files(tmp_path, lavis_files):
    _, blip2_path, _, _ = lavis_files
    linear = torch.nn.Linear(Q_WIDTH, 4096)
    with pytest.raises(CheckpointError, match="looks like a LAVIS BLIP-2/EVA checkpoint, not a MiniGPT-4 projector"):
        released_weights.load_minigpt4_projector(linear, blip2_path, llm_hidden=4096)
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, Q_WIDTH)}}, tmp_path / "nobias.pth")
    with pytest.raises(CheckpointError, match=r"missing: \['llama_proj.bias'\]"):
        released_weights.load_minigpt4_projector(linear, tmp_path / "nobias.pth", llm_hidden=4096)
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, 768), "llama_proj.bias": torch.zeros(4096)}},
               tmp_path / "wide_in.pth")
    with pytest.raises(CheckpointError, match="768-wide inputs, BLIP-2 Q-Former queries.*visual tokens are 16-wide"):
        released_weights.load_minigpt4_projector(linear, tmp_path / "wide_in.pth", llm_hidden=4096)


# ----------------------------------------------------------------------------------- own checkpoints


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(3, 2)
        self.prior = torch.nn.Parameter(torch.randn(2))


def test_trainable_round_trip_and_checks(tmp_path):
    source, target = _Model(), _Model()
    path = tmp_path / "sub" / "step_10.safetensors"
    ckpt.save_trainable(path, ckpt.trainable_tensors(source))
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_10.safetensors"]
    frozen_before = target.frozen.weight.clone()
    loaded = ckpt.load_trainable(target, path)
    assert sorted(loaded) == ["head.bias", "head.weight", "prior"]
    assert torch.equal(target.head.weight, source.head.weight) and torch.equal(target.prior, source.prior)
    assert torch.equal(target.frozen.weight, frozen_before)  # not in the file, untouched

    ckpt.save_trainable(tmp_path / "partial.safetensors", {"head.weight": source.head.weight})
    with pytest.raises(CheckpointError, match=r"2 trainable parameter\(s\) not in the file: prior, head.bias"):
        ckpt.load_trainable(target, tmp_path / "partial.safetensors")
    extra = {**ckpt.trainable_tensors(source), "llama_proj_std.w": torch.ones(1)}
    ckpt.save_trainable(tmp_path / "extra.safetensors", extra)
    with pytest.raises(CheckpointError, match="does not have: llama_proj_std.w"):
        ckpt.load_trainable(target, tmp_path / "extra.safetensors")
    ckpt.save_trainable(tmp_path / "shape.safetensors", {**ckpt.trainable_tensors(source), "prior": torch.ones(5)})
    with pytest.raises(CheckpointError, match=r"prior: checkpoint \(5,\) vs model \(2,\)"):
        ckpt.load_trainable(target, tmp_path / "shape.safetensors")


def test_meta_built_encoder_receives_converted_file_by_assignment(tmp_path, lavis_files):
    vit_path, blip2_path, vit, blip2 = lavis_files
    out = tmp_path / "encoder.safetensors"
    state = released_weights.read_lavis_encoder_state(vit_path, blip2_path, num_vit_blocks=BLOCKS)
    ckpt.save_state_file(out, state)
    with torch.device("meta"):
        encoder = new_encoder()
    released_weights.load_encoder_weights(encoder, out, assign=True)
    assert not any(t.is_meta for t in encoder.state_dict().values())
    with torch.no_grad():
        torch.testing.assert_close(encoder(PIXELS), reference_forward(vit, blip2, PIXELS), atol=1e-5, rtol=0)


# ------------------------------------------------- out-of-range weights end to end (issue 13 item 3)

ROOT = Path(__file__).resolve().parents[1]


def _float64_projector_with_1e300(model) -> dict[str, torch.Tensor]:
    """The model's trainable tensors as float64, one entry 1e300: finite in the file, inf once cast to fp32."""
    tensors = {k: v.detach().double().clone() for k, v in ckpt.trainable_tensors(model).items()}
    tensors["projector.llama_proj.weight"][0, 0] = 1e300
    return tensors


def test_evaluate_refuses_a_float64_projector_beyond_fp32_instead_of_scoring_empty_answers(
        tmp_path, tiny_tokenizer_dir, tiny_model_factory, capsys, monkeypatch):
    """Before: the 1e300 became inf in fp32, the logits NaN, every answer "", POPE scored them all "yes"
    (recall 1.0, exit 0). Now: exit 2 naming the file and the tensor, and no answer or metric is written."""
    import yaml
    from PIL import Image

    import evaluate
    from minigpt4.common.tiny_models import tiny_model_config

    monkeypatch.setenv("HOME", str(tmp_path))
    bad = tmp_path / "trainable.safetensors"
    ckpt.save_state_file(bad, _float64_projector_with_1e300(tiny_model_factory("vib")))
    (tmp_path / "val2014").mkdir()
    Image.new("RGB", (32, 32), (90, 20, 200)).save(tmp_path / "val2014" / "COCO_val2014_000000000001.jpg")
    (tmp_path / "pope").mkdir()
    (tmp_path / "pope" / "random.jsonl").write_text("".join(json.dumps(
        {"question_id": q, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog?",
         "label": "yes" if q % 2 else "no"}) + "\n" for q in range(4)))
    out = tmp_path / "out"
    cfg = {"model": tiny_model_config(tiny_tokenizer_dir, "vib", ckpt=str(bad)),
           "eval": {"tasks": ["pope"], "output_dir": str(out), "image_dir": str(tmp_path / "val2014"), "device": "cpu",
                    "bootstrap": 0, "vis_processor": {"name": "blip2_image_eval", "image_size": 28},
                    "pope": {"dir": str(tmp_path / "pope"), "splits": ["random"], "max_new_tokens": 4}}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    assert evaluate.main(["--cfg-path", str(tmp_path / "eval.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in (str(bad), "'projector.llama_proj.weight'", "1e+300", "torch.float32", "would become inf"):
        assert fragment in err, (fragment, err)
    assert not (out / "pope_random_answers.jsonl").exists() and not (out / "metrics.json").exists()


def test_training_refuses_a_float64_projector_beyond_fp32_instead_of_blaming_the_learning_rate(tmp_path, capsys):
    """Before: training skipped 5 steps of NaN loss and advised lowering run.init_lr. Now: exit 2 at load time,
    naming the file and the tensor."""

    import train

    prepare = load_script("prepare_tiny")
    prepare.prepare(str(tmp_path / "tiny"), num_train=8, num_val=2)
    d = tmp_path / "tiny"
    weight = torch.zeros(64, 32, dtype=torch.float64)  # the tiny recipe's LLM is 64 wide, its Q-Former 32
    weight[5, 7] = 1e300
    bad = tmp_path / "prerained_minigpt4.pth"
    torch.save({"model": {"llama_proj.weight": weight, "llama_proj.bias": torch.zeros(64, dtype=torch.float64)}}, bad)
    options = [f"model.tokenizer_path={d}/tokenizer", f"datasets.caption_json.ann_path={d}/world/train_captions.json",
               f"datasets.caption_json.image_dir={d}/world/images", f"run.output_dir={tmp_path}/out",
               f"model.projector_path={bad}"]
    assert train.main(["--cfg-path", str(ROOT / "train_configs" / "tiny_cpu.yaml"), "--options", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "init_lr" not in err, err
    for fragment in (str(bad), "'llama_proj.weight'", "1e+300", "torch.float32"):
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "out" / "checkpoints").exists()
