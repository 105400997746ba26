"""Visual Contrastive Decoding (issue 18): the distortion and the contrastive scores against the source's formulas,
batched two-stream decoding against a batch-1 reference written here (no KV cache, no padding) for MiniGPT-4 and
LLaVA-1.5, α = 0 against plain greedy decoding, the config's refusals, and evaluate.py end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
from _model_checks import toy_batch

from minigpt4.models.contrastive_decoding import (
    ContrastiveDecoding,
    contrastive_logits,
    contrastive_token_ids,
    cumulative_alphas,
    diffuse,
    distort_image,
    generate_contrastive,
)

PROMPTS = ["###Human: <Img><ImageHere></Img> Describe this image.###Assistant:",
           "A chat. ###Human: <Img><ImageHere></Img> Is there a dog in the image? Answer please.###Assistant:"]
LLAVA_PROMPTS = ["USER: <ImageHere>\nDescribe this image. ASSISTANT:",
                 "A chat. USER: <ImageHere>\nIs there a dog in the image? Answer please. ASSISTANT:"]


# ---- the source's formulas ------------------------------------------------------------------------------------------
def test_distortion_is_the_sources_forward_process_at_its_step():
    """DAMO-NLP-SG/VCD:vcd_utils/vcd_add_noise.py: 1000 steps, β_i = sigmoid(linspace(−6, 6))·(5e-3 − 1e-5) + 1e-5,
    x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε, computed here by hand in float64."""
    t, alpha_bar = 500, 1.0
    for i in range(t + 1):
        beta = (0.5e-2 - 1e-5) / (1 + math.exp(-(-6 + 12 * i / 999))) + 1e-5
        alpha_bar *= 1 - beta
    image = torch.tensor([[[0.5, -1.0], [2.0, 0.0]], [[1.5, 0.25], [-2.0, 1.0]], [[0.0, 0.0], [3.0, -0.5]]])
    noise = torch.tensor([[[1.0, -1.0], [0.5, 2.0]], [[-0.5, 0.0], [1.0, -2.0]], [[0.3, -0.7], [0.0, 1.2]]])
    expected = math.sqrt(alpha_bar) * image + math.sqrt(1 - alpha_bar) * noise
    kept = image.clone()
    assert torch.allclose(diffuse(image, t, noise), expected, atol=1e-5)
    assert torch.equal(image, kept)  # pure: the clean image is not touched
    assert 0.86 < math.sqrt(alpha_bar) < 0.87  # step 500: v′ = 0.863·x_0 + 0.505·ε (by hand)
    assert abs(float(cumulative_alphas()[t]) - alpha_bar) < 1e-5
    # seeded noise: the same seed, the same v′; another seed, another v′; drawn on the CPU from that seed alone
    x = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1))
    drawn = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(distort_image(x, t, seed=3), diffuse(x, t, drawn))
    assert not torch.equal(distort_image(x, t, seed=3), distort_image(x, t, seed=4))
    with pytest.raises(ValueError, match="noise_step = 1000"):
        diffuse(image, 1000, noise)


def test_contrastive_scores_and_the_plausibility_cut_off_by_hand():
    """(1+α)·l − α·l′ over the tokens with p ≥ β·max p (DAMO-NLP-SG/VCD:vcd_utils/vcd_sample.py, "version 2")."""
    logits = torch.tensor([[3.0, 2.0, 0.0, -5.0]])
    distorted = torch.tensor([[3.0, 0.5, 1.0, -5.0]])
    # β = 0.1: p_1/p_0 = e^-1 ≥ 0.1 is kept, p_2/p_0 = e^-3 < 0.1 is not; kept: 2·3 − 3 = 3 and 2·2 − 0.5 = 3.5
    scores = contrastive_logits(logits, distorted, alpha=1.0, beta=0.1)
    assert scores.tolist() == [[3.0, 3.5, -math.inf, -math.inf]]
    assert contrastive_logits(logits, distorted, alpha=0.0, beta=1.0).tolist() == [[3.0] + [-math.inf] * 3]


# ---- batched decoding against a batch-1 reference -------------------------------------------------------------------
def reference_vcd(model, prompt: str, features, distorted, decoding: ContrastiveDecoding, seed: int,
                  max_new_tokens: int, stop: str | None) -> list[int]:
    """One prompt, no padding, no KV cache: both streams re-run over the whole sequence at every step."""
    text = model.build_generation_text([prompt])
    with torch.no_grad():
        visual = model.project(torch.cat([features, distorted]))[0]
        streams = [model.embed(text, visual[:1]), model.embed(text, visual[1:])]
        generator = torch.Generator().manual_seed(seed)
        ids: list[int] = []
        for _ in range(max_new_tokens):
            new = model.llm.get_input_embeddings()(torch.tensor([ids], dtype=torch.long))
            clean, noisy = (model.llm(inputs_embeds=torch.cat([s, new], dim=1)).logits[0, -1] for s in streams)
            probs = torch.softmax(clean, dim=-1)
            scores = ((1 + decoding.alpha) * clean - decoding.alpha * noisy).masked_fill(
                probs < decoding.beta * probs.max(), -math.inf)
            if decoding.sample:
                token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
            else:
                token = int(scores.argmax())
            ids.append(token)
            if token == model.tokenizer.eos_token_id or (stop and stop in model.tokenizer.decode(ids)):
                break
    return ids


def _pair_features(model, images):
    """Encoder outputs of the images and of a second stream. The tiny random encoders barely tell images apart
    (the MiniGPT-4 one gives the same outputs for v and v′ to 1e-7), so the second stream is random features: any
    v′ the decoding must contrast against."""
    features = model.encode_images(images)
    return features, torch.randn(features.shape, generator=torch.Generator().manual_seed(5))


def _check_batched_equals_reference(model, prompts, images):
    features, distorted = _pair_features(model, images)
    seeds = [11, 12]
    for decoding in (ContrastiveDecoding(alpha=1.0, beta=0.1, noise_step=500, sample=True),
                     ContrastiveDecoding(alpha=1.0, beta=0.05, noise_step=500, sample=False)):
        free = contrastive_token_ids(model, prompts, features, distorted, decoding, row_seeds=seeds,
                                     max_new_tokens=10, stop_strings=[])
        assert free.shape == (2, 10)
        # an end string taken from row 0's free text: row 0 must stop early, each row on its own
        text0 = model.tokenizer.decode(free[0])
        start = next(i for i in range(2, len(text0) - 1) if text0[i:i + 2].isascii() and text0[i:i + 2].isalpha())
        marker = text0[start:start + 2]
        batched = contrastive_token_ids(model, prompts, features, distorted, decoding, row_seeds=seeds,
                                        max_new_tokens=10, stop_strings=[marker])
        lengths = []
        for row, prompt in enumerate(prompts):
            single = reference_vcd(model, prompt, features[row:row + 1], distorted[row:row + 1], decoding,
                                   seeds[row], 10, marker)
            got = batched[row].tolist()
            assert got[:len(single)] == single, (decoding, row)
            assert all(t == model.tokenizer.pad_token_id for t in got[len(single):])  # stopped: padding after
            lengths.append(len(single))
        assert lengths[0] < 10 and batched.shape[1] == max(lengths)  # row 0 stopped early; the batch at its last
    # the contrast is not a no-op on this model: VCD picks other tokens than α = 0 somewhere
    plain = ContrastiveDecoding(alpha=0.0, beta=0.05, noise_step=500, sample=False)
    assert not torch.equal(contrastive_token_ids(model, prompts, features, distorted, plain, row_seeds=seeds,
                                                 max_new_tokens=10, stop_strings=[]),
                           contrastive_token_ids(model, prompts, features, distorted, decoding, row_seeds=seeds,
                                                 max_new_tokens=10, stop_strings=[]))


@pytest.mark.parametrize("projector", ["linear", "adavib"])
def test_batched_vcd_equals_the_batch_one_reference_minigpt4(tiny_model_factory, projector):
    model = tiny_model_factory("vib" if projector == "adavib" else "linear").eval()
    _check_batched_equals_reference(model, PROMPTS, toy_batch()["image"])


def test_batched_vcd_equals_the_batch_one_reference_llava(tiny_tokenizer_dir):
    from test_llava import tiny_llava_config

    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)
    model = build_model(tiny_llava_config(tiny_tokenizer_dir, "vib", vib=dict(num_samples=2, beta=1e-2,
                                                                                 adaptive=False))).eval()
    _check_batched_equals_reference(model, LLAVA_PROMPTS, toy_batch()["image"])


def test_alpha_zero_is_plain_greedy_decoding(tiny_model_factory):
    """α = 0 without sampling: the cut-off always keeps the top token, so VCD is the argmax of the clean stream."""
    model = tiny_model_factory("vib").eval()
    images = toy_batch()["image"]
    features, distorted = _pair_features(model, images)
    model.end_sym = "\u0000never"
    plain = ContrastiveDecoding(alpha=0.0, beta=0.1, noise_step=500, sample=False)
    vcd = generate_contrastive(model, PROMPTS, features, distorted, plain, row_seeds=[0, 1], max_new_tokens=12)
    assert vcd == model.generate(PROMPTS, images, max_new_tokens=12) and all(vcd)


def test_non_finite_logits_are_refused(tiny_model_factory):
    from minigpt4.models.numerics import NonFiniteLogitsError

    model = tiny_model_factory("linear").eval()
    features, distorted = _pair_features(model, toy_batch()["image"])
    distorted[1] = float("nan")  # the distorted stream of row 1 only
    decoding = ContrastiveDecoding(alpha=1.0, beta=0.1, noise_step=500)
    with pytest.raises(NonFiniteLogitsError, match=r"row\(s\) \[3\]"):
        contrastive_token_ids(model, PROMPTS, features, distorted, decoding, row_seeds=[0, 1], max_new_tokens=3)


# ---- the evaluation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, key", [
    ("eval.vcd.alpha=-0.5", "eval.vcd.alpha"), ("eval.vcd.beta=0", "eval.vcd.beta"),
    ("eval.vcd.beta=1.5", "eval.vcd.beta"), ("eval.decoding=contrastive", "eval.decoding"),
    ("eval.vcd.noise_step=1000", "eval.vcd.noise_step"), ("eval.num_beams=3", "eval.num_beams")])
def test_bad_vcd_settings_are_refused_naming_the_key(tmp_path, tiny_tokenizer_dir, capsys, option, key):
    from test_evaluate import refused_settings_error

    decoding = [] if option.startswith("eval.decoding") else ["eval.decoding=vcd"]
    err = refused_settings_error(tmp_path, tiny_tokenizer_dir, capsys, [*decoding, option])
    assert key in err, err


def test_evaluate_with_vcd_labels_and_fingerprints_it(tmp_path, tiny_model_factory, tiny_tokenizer_dir, capsys,
                                                      monkeypatch):
    from test_evaluate import random_split_runner

    out, run = random_split_runner(tmp_path, tiny_model_factory, tiny_tokenizer_dir, monkeypatch, "vcd")
    assert run(out, "eval.decoding=vcd") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    pope_label = "single-string-pope+overrides+vcd(α=1,β=0.2,t=500,sample)"
    chair_label = "describe-sampled-500+overrides+vcd(α=1,β=0.1,t=500,sample)"
    assert metrics["pope"]["protocol"] == metrics["protocols"]["pope"]["label"] == pope_label
    assert metrics["chair"]["protocol"] == chair_label and metrics["chair"]["decoding"] == "vcd(α=1,β=0.1,t=500,sample)"
    assert metrics["protocol"].startswith(pope_label) and metrics["protocol"].endswith(chair_label)
    assert metrics["protocols"]["pope"]["decoding_parameters"] == {
        "name": "vcd", "alpha": 1.0, "beta": 0.2, "noise_step": 500, "sample": True, "temperature": 1.0, "top_p": 1.0,
        "top_k": 0, "seed": 55, "source": metrics["protocols"]["pope"]["decoding_parameters"]["source"]}
    fields = json.loads((out / "pope_random_answers.fingerprint.json").read_text())["fields"]
    assert fields["eval.decoding"] == "vcd" and fields["eval.vcd.beta"] == 0.2
    answers = (out / "pope_random_answers.jsonl").read_text()
    # a greedy run, or another β, never resumes the VCD answers (refused before the model is built)
    capsys.readouterr()
    assert run(out) == 2 and "eval.decoding: 'vcd' -> '(not recorded)'" in capsys.readouterr().err
    assert run(out, "eval.decoding=vcd", "eval.vcd.beta=0.5") == 2
    assert "eval.vcd.beta: 0.2 -> 0.5" in capsys.readouterr().err
    # the same settings from scratch draw the same answers; with the feature cache too (v′ cached apart)
    again, cached, cache = tmp_path / "again", tmp_path / "cached", tmp_path / "features"
    assert run(again, "eval.decoding=vcd", "eval.tasks=[pope]", "eval.batch_size=2") == 0
    assert (again / "pope_random_answers.jsonl").read_text() == answers
    assert run(cached, "eval.decoding=vcd", "eval.tasks=[pope]", f"eval.feature_cache={cache}") == 0
    assert (cached / "pope_random_answers.jsonl").read_text() == answers
    assert len(list(cache.rglob("*.safetensors"))) == 2 * 4  # 4 images: clean and distorted entries apart
    greedy = tmp_path / "greedy"
    assert run(greedy, "eval.tasks=[pope]") == 0
    assert json.loads((greedy / "metrics.json").read_text())["pope"]["decoding"] == "greedy"
    assert (greedy / "pope_random_answers.jsonl").read_text() != answers
