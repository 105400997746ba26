"""The demo's logic without a browser: uploads, diagnostics, streamed chat, compare mode, highlighting, and
the friendly messages for bad input. Runs on tiny random models."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from minigpt4.common.config import ConfigError
from minigpt4.common.config_files import load_model_config
from minigpt4.demo import loading
from minigpt4.demo.chat import BASE, COMPARE, DecodingSettings, DemoEngine, DemoInputError, visible_answer
from minigpt4.demo.diagnostics import diagnostics_markdown
from minigpt4.demo.highlight import highlight_html, highlight_pair, object_mentions
from minigpt4.eval.chair import CHAIRScorer
from minigpt4.models.checkpoints import CheckpointError, save_trainable, trainable_tensors
from minigpt4.models.vib import pool_tokens
from minigpt4.models.visual_diagnostics import ImageDiagnostics, diagnose_features, pooled_visual_tokens, token_text


@pytest.fixture(scope="module")
def scorer():
    return CHAIRScorer()


@pytest.fixture
def model(tiny_model_factory):
    return tiny_model_factory("vib", seed=0).eval()


@pytest.fixture
def engine(model, scorer):
    return DemoEngine(model, loading.image_processor_for(model), scorer_factory=lambda: scorer)


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return str(path)


def _compare_ckpt(tiny_model_factory, tmp_path, projector="vib", seed=1) -> str:
    other = tiny_model_factory(projector, seed=seed)
    path = tmp_path / f"{projector}_{seed}.safetensors"
    save_trainable(path, trainable_tensors(other))
    return str(path)


# ------------------------------------------------------------------------------------------ diagnostics
def test_upload_computes_the_training_statistics(engine, model, image_path):
    state, preview, markdown = engine.upload(engine.new_state(), image_path)
    # 56×40 is too small to look at: enlarged by a whole factor (6) with sharp pixels, aspect ratio kept.
    assert preview.size == (336, 240) and state.image_name == "scene.png"
    original = np.asarray(Image.open(image_path).convert("RGB"))
    assert np.array_equal(np.asarray(preview)[::6, ::6], original)
    diag = state.diagnostics[BASE]
    # The same H/log V the VIB projector reports (what training logs), and α = -log of it.
    _, info = model.project(state.features)
    assert diag.entropy_ratio == pytest.approx(info["entropy_ratio"].item(), rel=1e-5)
    assert diag.alpha == pytest.approx(-math.log(diag.entropy_ratio), rel=1e-5)
    assert 0 < diag.entropy_ratio <= 1 and diag.vocab_size == len(model.tokenizer)
    # Top words: the argmax of softmax(u·Eᵀ), computed here independently, in decreasing order.
    mu = model.projector.llama_proj(state.features)
    u = mu.sum(1) / math.sqrt(mu.shape[1])
    probs = torch.softmax(u @ model.embed_weight.T, -1)[0]
    top = probs.topk(10)
    assert [p for _, p in diag.top_words] == pytest.approx(top.values.tolist(), rel=1e-4)
    assert [w for w, _ in diag.top_words] == [token_text(model.tokenizer, int(i)) for i in top.indices]
    assert f"{diag.entropy_ratio:.4g}" in markdown and f"{diag.alpha:.4g}" in markdown and "H/log V" in markdown
    assert diag.pooled_norm == pytest.approx(float(u[0].norm()), rel=1e-5)
    assert diag.word_norm == pytest.approx(float(model.embed_weight.norm(dim=-1).mean()), rel=1e-5)


def test_pooled_tokens_are_the_mean_not_a_noise_sample(model):
    features = torch.randn(2, 4, 32)
    model.train()  # even if someone left the model training, diagnostics use μ
    first = pooled_visual_tokens(model, features)
    second = pooled_visual_tokens(model, features)
    assert torch.equal(first, second) and model.projector.training  # and the mode is restored
    assert torch.allclose(first, pool_tokens(model.projector.llama_proj(features)), atol=1e-6)


def test_peaked_tokens_have_low_entropy_and_large_alpha(model):
    # Make one vocabulary row huge and aligned with the visual tokens: p concentrates on it.
    features = torch.randn(1, 4, 32)
    u = pooled_visual_tokens(model, features)[0]
    with torch.no_grad():
        model.embed_weight[7] = 100 * u / u.norm()
    diag = diagnose_features(model, features, top_k=3)[0]
    assert diag.entropy_ratio < 0.05 and diag.alpha > 3 and diag.top_words[0][1] > 0.9


def test_diagnostics_table_shows_tokens_safely():
    diag = ImageDiagnostics(0.5, math.log(2), [(" dog", 0.5), ("a|b", 0.2), ("<b>", 0.1), ("\x03", 0.1)], 400,
                            981.4, 3.21)
    markdown = diagnostics_markdown(diag, "Base")
    assert "| 1 | ␣dog | 0.5000 |" in markdown and "a&#124;b" in markdown and "&lt;b&gt;" in markdown
    assert "\\x03" in markdown and "H/log V = **0.5**" in markdown and "**0.6931**" in markdown
    assert "‖u‖ = 981.4 " in markdown and "against 3.21 for the mean word" in markdown
    tiny = diagnostics_markdown(ImageDiagnostics(6.9e-5, 9.58, [], 49152, 1e3, 3.2), "Real")
    assert "H/log V = **6.9e-05**" in tiny  # four decimals would show 0.0000 (a real vocabulary's base model)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_files_get_friendly_messages(engine, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(DemoInputError, match="notes.txt.*not a recognised image format.*different image"):
        engine.upload(engine.new_state(), str(text))
    good = tmp_path / "ok.png"
    Image.new("RGB", (30, 30), "red").save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DemoInputError, match="broken.png"):
        engine.upload(engine.new_state(), str(broken))
    with pytest.raises(DemoInputError, match="No file"):
        engine.upload(engine.new_state(), None)


def test_oversized_image_is_refused_before_decoding(model, tmp_path):
    engine = DemoEngine(model, loading.image_processor_for(model), max_pixels=500)
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 30)).save(path)
    with pytest.raises(DemoInputError, match="900 pixels exceeds max_pixels=500"):
        engine.upload(engine.new_state(), str(path))


def test_question_checks(engine, image_path):
    with pytest.raises(DemoInputError, match="Upload an image first"):
        next(engine.answer(engine.new_state(), "what is it?", DecodingSettings()))
    state, _, _ = engine.upload(engine.new_state(), image_path)
    with pytest.raises(DemoInputError, match="Type a question"):
        next(engine.answer(state, "   ", DecodingSettings()))
    with pytest.raises(DemoInputError, match="beams"):
        next(engine.answer(state, "hi", DecodingSettings(num_beams=0)))
    with pytest.raises(DemoInputError, match="--compare-ckpt"):
        next(engine.answer(state, "hi", DecodingSettings(), compare=True))
    with pytest.raises(DemoInputError, match="too long"):
        next(engine.answer(state, "hi", DecodingSettings(max_new_tokens=2000)))
    assert state.conversations[BASE].turns == []  # refused questions leave no trace


# ------------------------------------------------------------------------------------------ chat
def test_streamed_answer_equals_plain_generation_and_history_grows(engine, model, image_path):
    state, _, _ = engine.upload(engine.new_state(), image_path)
    settings = DecodingSettings(max_new_tokens=12)
    prompt = state.conversations[BASE].template.prompt("what is in the image?")
    expected = model.generate([prompt], image_features=state.features, max_new_tokens=12)[0]
    updates = list(engine.answer(state, "what is in the image?", settings))
    assert updates[-1].status == "Done." and len(updates) >= 2
    assert state.conversations[BASE].turns == [("what is in the image?", expected)]
    final = updates[-1].messages[BASE]
    assert [m["role"] for m in final] == ["user", "assistant"] and "▌" not in final[-1]["content"]
    assert all("▌" in u.messages[BASE][-1]["content"] for u in updates[:-1])  # streaming cursor while pending
    # Second turn: the prompt carries the first exchange and the image only once.
    list(engine.answer(state, "and the colours?", settings))
    prompt2 = state.conversations[BASE].prompt()
    assert prompt2.count("<ImageHere>") == 1 and expected in prompt2 and len(state.conversations[BASE].turns) == 2


def test_beam_search_is_answered_in_one_piece(engine, model, image_path):
    state, _, _ = engine.upload(engine.new_state(), image_path)
    updates = list(engine.answer(state, "describe", DecodingSettings(max_new_tokens=4, num_beams=2)))
    prompt = state.conversations[BASE].template.prompt("describe")
    expected = model.generate([prompt], image_features=state.features, max_new_tokens=4, num_beams=2)[0]
    assert len(updates) == 2 and state.conversations[BASE].turns[-1][1] == expected


def test_failed_generation_leaves_no_open_question(engine, model, image_path, monkeypatch):
    state, _, _ = engine.upload(engine.new_state(), image_path)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(engine.answer(state, "describe", DecodingSettings(max_new_tokens=4)))
    assert state.conversations[BASE].turns == []
    monkeypatch.undo()
    assert list(engine.answer(state, "describe", DecodingSettings(max_new_tokens=4)))[-1].status == "Done."


def test_cancelled_answer_is_forgotten_and_generation_finished(engine, image_path):
    import threading

    state, _, _ = engine.upload(engine.new_state(), image_path)
    stream = engine.answer(state, "describe", DecodingSettings(max_new_tokens=6))
    next(stream)
    stream.close()  # what Gradio does when the page cancels an event
    assert state.conversations[BASE].turns == []
    assert not any(t.name.startswith("generate-") for t in threading.enumerate())


def test_visible_answer_hides_end_string_and_its_prefix():
    assert visible_answer("a cat ###Human", "###") == "a cat"
    assert visible_answer("a cat ##", "###") == "a cat"
    assert visible_answer("a cat #", "###") == "a cat"
    assert visible_answer("a cat", "###") == "a cat"
    assert visible_answer("a cat\n", "") == "a cat"


# ------------------------------------------------------------------------------------------ compare
def test_compare_projector_shares_the_backbone(tiny_model_factory, model, tmp_path):
    path = _compare_ckpt(tiny_model_factory, tmp_path)
    base_weight = model.projector.llama_proj.weight.detach().clone()
    view = loading.with_projector_checkpoint(model, path)
    assert view.llm is model.llm and view.encoder is model.encoder and view.tokenizer is model.tokenizer
    assert view.projector is not model.projector
    assert torch.equal(model.projector.llama_proj.weight, base_weight)  # the base projector is untouched
    torch.manual_seed(1)
    expected = tiny_model_factory("vib", seed=1).projector.llama_proj.weight
    assert torch.equal(view.projector.llama_proj.weight, expected)
    # A checkpoint of the other projector kind builds that kind around the same mean-head shape.
    linear_view = loading.with_projector_checkpoint(model, _compare_ckpt(tiny_model_factory, tmp_path, "linear"))
    assert type(linear_view.projector).__name__ == "LinearProjector"
    assert type(loading.with_projector_checkpoint(linear_view, path).projector).__name__ == "VIBProjector"
    bad = tmp_path / "wrong_width.safetensors"
    save_trainable(bad, {"projector.llama_proj.weight": torch.zeros(3, 3), "projector.llama_proj.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="llama_proj.weight"):
        loading.with_projector_checkpoint(model, str(bad))
    with pytest.raises(ConfigError, match="not found"):
        loading.with_projector_checkpoint(model, str(tmp_path / "missing.safetensors"))


def test_compare_mode_answers_side_by_side(tiny_model_factory, model, scorer, image_path, tmp_path):
    view = loading.with_projector_checkpoint(model, _compare_ckpt(tiny_model_factory, tmp_path))
    engine = DemoEngine(model, loading.image_processor_for(model), compare_model=view, scorer_factory=lambda: scorer)
    state, _, markdown = engine.upload(engine.new_state(), image_path)
    assert "Base projector" in markdown and "Compare projector" in markdown
    assert state.diagnostics[BASE].entropy_ratio != state.diagnostics[COMPARE].entropy_ratio
    updates = list(engine.answer(state, "describe", DecodingSettings(max_new_tokens=6), compare=True))
    final = updates[-1].messages
    assert len(final[BASE]) == 2 and len(final[COMPARE]) == 2
    prompt = state.conversations[COMPARE].template.prompt("describe")
    assert state.conversations[COMPARE].turns[0][1] == view.generate([prompt], image_features=state.features,
                                                                      max_new_tokens=6)[0]
    # Without compare mode only the base projector answers.
    list(engine.answer(state, "again", DecodingSettings(max_new_tokens=4)))
    assert len(state.conversations[BASE].turns) == 2 and len(state.conversations[COMPARE].turns) == 1


def test_highlighted_history_after_answer(engine, image_path, monkeypatch, model):
    state, _, _ = engine.upload(engine.new_state(), image_path)
    monkeypatch.setattr(model, "generate", lambda *a, **k: ["A dog <b>and</b> a hot dog."])
    final = list(engine.answer(state, "what?", DecodingSettings(num_beams=2)))[-1].messages[BASE][-1]["content"]
    assert ">dog</mark>" in final and ">hot dog</mark>" in final and "&lt;b&gt;" in final and "<b>" not in final


# ------------------------------------------------------------------------------------------ highlighting
CAPTIONS = [  # (caption, the exact text each mention covers)
    ("A man riding bikes next to a Hot Dog stand.", ["man", "bikes", "Hot Dog"]),
    ("Two toilets, one with a seat, and a wine glass.", ["toilets", "wine glass"]),
    ('He said "look at the zebras" near the traffic light.', ["zebras", "traffic light"]),
    ("A baby elephant and a teddy bear on a couch; no person.",
     ["baby elephant", "teddy bear", "couch", "person"]),
    ("İstanbul: a cat and a laptop computer.", ["cat", "laptop computer"]),
]


@pytest.mark.parametrize("caption,covered", CAPTIONS)
def test_mentions_match_the_chair_scorer(scorer, caption, covered):
    mentions = object_mentions(scorer, caption)
    words, canonical = scorer.caption_to_objects(caption)
    assert [m.word for m in mentions] == words and [m.canonical for m in mentions] == canonical
    assert [caption[m.start:m.end] for m in mentions] == covered


def test_highlight_html_escapes_and_marks(scorer):
    text = "A <script>dog</script> & a cat"
    out = highlight_html(text, object_mentions(scorer, text))
    assert "<script>" not in out and "&lt;script&gt;" in out and "&amp;" in out
    assert out.count("<mark") == 2 and 'title="dog"' in out and 'title="cat"' in out
    first, second = highlight_pair(scorer, "a dog and a cat", "a dog and a truck")
    assert first.count("chair-only") == 1 and 'chair-only" style' in first.split("cat")[0]
    assert "truck</mark>" in second and second.count("chair-only") == 1
    # CHAIR's own quirk carries over: pattern singularizes "bus" to "bu", which is no object word.
    assert "<mark" not in highlight_html("a bus", object_mentions(scorer, "a bus"))


# ------------------------------------------------------------------------------------------ config
def test_default_model_config_falls_back_to_tiny_random(tmp_path):
    cfg = loading.default_model_config(tmp_path / "missing.yaml", cache=tmp_path / "cache")
    assert cfg.llm_path is None and cfg.full_ckpt is None and cfg.num_query_tokens == 4
    assert (tmp_path / "cache" / "tiny_tokenizer" / "tokenizer.json").is_file()
    assert "random weights" in loading.describe_model(cfg)


def test_default_model_config_uses_the_shapes_model_when_present(tmp_path, tiny_tokenizer_dir):
    folder = tmp_path / "shapes_base"
    folder.mkdir()
    (folder / "trainable.safetensors").write_bytes(b"x")
    (folder / "model.yaml").write_text(
        f"model:\n  tokenizer_path: {tiny_tokenizer_dir}\n  ckpt: trainable.safetensors\n  num_query_tokens: 4\n")
    cfg = loading.default_model_config(folder / "model.yaml")
    assert cfg.ckpt == str(folder / "trainable.safetensors")  # relative to the YAML's folder
    assert cfg.num_query_tokens == 4 and "trainable.safetensors" in loading.describe_model(cfg)


def test_eval_config_extras_pick_transform_and_synonyms(tmp_path, tiny_tokenizer_dir, model):
    synonyms = tmp_path / "syn.txt"
    synonyms.write_text("circle, disc\nsquare, box\n")
    path = tmp_path / "eval.yaml"
    path.write_text(f"model:\n  tokenizer_path: {tiny_tokenizer_dir}\n"
                    "eval:\n  vis_processor: {name: blip2_image_eval, image_size: 32}\n"
                    "  chair:\n    synonyms: syn.txt\n")
    vis, found = loading.demo_extras(path)
    assert vis == {"name": "blip2_image_eval", "image_size": 32} and found == str(synonyms)
    assert loading.image_processor_for(model, vis)(Image.new("RGB", (50, 20))).shape == (3, 32, 32)
    assert loading.image_processor_for(model)(Image.new("RGB", (50, 20))).shape == (3, 28, 28)
    assert loading.demo_extras(None, shapes_yaml=tmp_path / "missing.yaml") == (None, None)
    shapes = tmp_path / "model.yaml"
    shapes.write_text("model:\n  arch: minigpt4\n")
    vis, shapes_syn = loading.demo_extras(None, shapes_yaml=shapes, cache=tmp_path / "cache")
    assert vis is None and CHAIRScorer(shapes_syn).caption_to_objects("two discs and a box")[1] == ["circle", "square"]


def test_model_config_errors_name_the_key(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("model:\n  llm_path: ???\n  mm_projector_type: vib\neval:\n  image_dir: ???\n")
    with pytest.raises(ConfigError, match="must be set.*--options model.llm_path="):
        load_model_config(path)
    with pytest.raises(ConfigError, match="model.<key>"):
        load_model_config(path, ["eval.batch_size=2"])
    with pytest.raises(ConfigError, match="unknown key 'model.llm_pth'"):
        load_model_config(path, ["model.llm_pth=x"])
    with pytest.raises(ConfigError, match="not found"):
        load_model_config(tmp_path / "nope.yaml")



def test_config_files_go_through_the_project_yaml_checks(tmp_path):
    """A duplicate key (which omegaconf alone would report as a yaml traceback) is a ConfigError naming
    file:line:column, for the model section and for the eval extras alike."""
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  arch: minigpt4\n  num_query_tokens: 4\n  arch: llava15\n")
    expected = rf"{path}:4:3: duplicate key 'arch' \(in the mapping that starts on line 2\)"
    with pytest.raises(ConfigError, match=expected):
        load_model_config(path)
    with pytest.raises(ConfigError, match=expected):
        loading.demo_extras(path)
    path.write_text("- model\n- eval\n")
    with pytest.raises(ConfigError, match=rf"{path}:1: the top level is a list; expected a mapping"):
        load_model_config(path)

# ------------------------------------------------------------------------------------------ gradio glue
@pytest.mark.filterwarnings("ignore::UserWarning")  # gr.Warning outside a request only warns
def test_handlers_turn_errors_into_status_lines(engine, tmp_path, image_path, model, monkeypatch):
    pytest.importorskip("gradio")
    from minigpt4.demo.app import build_demo, handle_example, handle_send, handle_upload

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    state, box, preview, diag, plot, _, _, status = handle_upload(engine, str(bad), engine.new_state())
    assert box is None and preview is None and plot is None and state.features is None
    assert "bad.jpg" in status and "⚠️" in status
    out = list(handle_send(engine, "hello", state, 1, False, 1.0, 0.9, 8, False))
    assert len(out) == 1 and "Upload an image first" in out[0][3]
    state, _, preview, diag, plot, _, _, status = handle_upload(engine, image_path, engine.new_state())
    assert "H/log V" in diag and status.startswith("Loaded scene.png")
    # The bar plot holds the table's numbers: one bar per top-k entry, the uniform 1/V line, H/log V in the title.
    (axes,) = plot.axes
    diag_base = state.diagnostics[BASE]
    assert [bar.get_height() for bar in axes.patches] == pytest.approx([p for _, p in diag_base.top_words])
    assert axes.lines[0].get_ydata()[0] == pytest.approx(1 / diag_base.vocab_size)
    assert f"H/log V = {diag_base.entropy_ratio:.3f}" in axes.get_title()
    monkeypatch.setattr(model, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    out = list(handle_send(engine, "hello", state, 2, False, 1.0, 0.9, 8, False))
    assert "Generation failed (RuntimeError: boom)" in out[-1][3]
    monkeypatch.undo()
    out = list(handle_send(engine, "hello", state, 1, False, 1.0, 0.9, 8, False))
    assert out[0][4] == "" and out[-1][3] == "Done." and out[-1][1][0]["content"] == "hello"
    demo = build_demo(engine, model_description="tiny")
    assert demo is not None
    # Clicking an example loads that file as an upload would, and empties the file box.
    class Click:
        index = 1

    examples = [str(bad), image_path]
    state, box, preview, diag, plot, _, _, status = handle_example(engine, examples, engine.new_state(), Click())
    assert box is None and status.startswith("Loaded scene.png") and plot is not None


def test_shapes_example_images_are_written_once_and_deterministic(tmp_path):
    first = loading.shapes_example_images(tmp_path / "a")
    again = loading.shapes_example_images(tmp_path / "b")
    assert len(first) == 4 and [Image.open(p).size for p in first] == [(64, 64)] * 4
    assert [open(p, "rb").read() for p in first] == [open(p, "rb").read() for p in again]
    assert len({open(p, "rb").read() for p in first}) == 4  # four different scenes
    stamp = [os.stat(p).st_mtime_ns for p in first]
    assert loading.shapes_example_images(tmp_path / "a") == first
    assert [os.stat(p).st_mtime_ns for p in first] == stamp  # reused, not rewritten
