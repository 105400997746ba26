"""`model.vib.entropy_of: length_free` (models/vib.py), the ablation issue 23 asks for: α from the entropy of the
pooled token rescaled to the mean word-embedding length. NOT the paper's formula, which stays the default."""
from __future__ import annotations

import math

import pytest
import torch

from minigpt4.common.config import ConfigError, VIBConfig
from minigpt4.models.vib import (
    VIBProjector,
    adaptive_weight,
    entropy_input,
    pool_tokens,
    rescaled_to_word_length,
    similarity_entropy,
)


@pytest.fixture
def embed() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(500, 16) * 0.2  # words about 0.8 long


def test_the_length_free_entropy_does_not_depend_on_the_length_of_u(embed):
    u = torch.randn(3, 16)
    short, long = (similarity_entropy(entropy_input(u * scale, embed, "length_free"), embed) for scale in (1, 100))
    torch.testing.assert_close(short, long)
    lengths = torch.linalg.vector_norm(rescaled_to_word_length(u * 100, embed), dim=-1)
    torch.testing.assert_close(lengths, torch.linalg.vector_norm(embed, dim=-1).mean().expand(3))
    # the paper's entropy collapses as u grows: exactly what the ablation takes out
    assert (similarity_entropy(u * 100, embed) < 0.5 * similarity_entropy(u, embed)).all()


def test_the_projector_takes_alpha_from_the_setting(embed):
    torch.manual_seed(1)
    q = torch.randn(2, 4, 8)
    alphas = {}
    for entropy_of in ("pooled", "length_free"):
        torch.manual_seed(2)
        projector = VIBProjector(8, 16, VIBConfig(entropy_of=entropy_of, num_samples=1, reparameterize=False))
        with torch.no_grad():
            projector.llama_proj.weight.mul_(50)  # a long pooled token, as a trained real projector gives
        projector.train()
        mu, info = projector(q, embed_weight=embed)
        u = pool_tokens(mu)
        expected = adaptive_weight(similarity_entropy(entropy_input(u, embed, entropy_of), embed), embed.shape[0])
        torch.testing.assert_close(info["alpha"], expected)
        alphas[entropy_of] = info["alpha"]
    assert (alphas["pooled"] > alphas["length_free"] + 1).all()  # a long u: the paper's α is much larger
    assert alphas["length_free"].max() < -math.log(0.5)


def test_the_paper_formula_is_the_default_and_a_wrong_name_is_refused():
    assert VIBConfig().entropy_of == "pooled"
    with pytest.raises(ConfigError, match="model.vib.entropy_of = 'length'; expected one of pooled, length_free"):
        VIBConfig(entropy_of="length").validate()


def test_the_measurement_script_reads_the_paper_formula_and_the_length_free_one(tiny_model_factory):
    """scripts/real_small_entropy.py per image: H/log V and α as vib.py computes them for the pooled μ, ‖u‖, and
    the length-free pair (which a 10× longer u leaves unchanged)."""
    from _scripts import load_script

    script = load_script("real_small_entropy")
    per_image, summary, markdown = script.per_image, script.summary, script.markdown
    model = tiny_model_factory("linear").eval()
    size = model.encoder.vision_config.image_size
    images = torch.randn(3, 3, size, size)
    rows = per_image(model, images)
    with torch.no_grad():
        u = pool_tokens(model.project(model.encode_images(images))[0].float())
    entropy = similarity_entropy(u, model.embed_weight)
    vocab = model.embed_weight.shape[0]
    torch.testing.assert_close(torch.tensor(rows["entropy_ratio"]), entropy / math.log(vocab))
    torch.testing.assert_close(torch.tensor(rows["u_norm"]), torch.linalg.vector_norm(u, dim=-1))
    with torch.no_grad():
        model.projector.llama_proj.weight.mul_(10)
        model.projector.llama_proj.bias.mul_(10)
    longer = per_image(model, images)
    torch.testing.assert_close(torch.tensor(longer["length_free_entropy_ratio"]),
                               torch.tensor(rows["length_free_entropy_ratio"]))
    table = markdown({"models": {"tiny": {"summary": {k: summary(rows[k]) for k in rows if k != "top_token"},
                                          "vocab_size": vocab, "word_length_mean": 1.0,
                                          "top_token": {"most_common": "x", "images": 2, "of": 3}}}})
    assert table.count("\n") == 2 and "| tiny | " in table


def test_figure1_joins_both_entropies_to_the_chair_verdicts_by_image(tmp_path):
    """--captions: the paper's and the length-free H/log V of each image meet that image's own CHAIR verdict
    (the captions file lists images in another order than the measurement)."""
    import json

    from _scripts import load_script

    from minigpt4.eval.entropy_correlation import entropy_hallucination_correlation

    rows = [{"image_id": i, "hallucinated": ["star"] if i in (3, 4) else []} for i in (4, 1, 3, 2, 6, 5)]
    (tmp_path / "chair.json").write_text(json.dumps({"per_caption": rows}))
    measured = {"images": ["1", "2", "3", "4", "5", "6"], "vocab_size": 49152,
                "per_image": {"entropy_ratio": [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
                              "length_free_entropy_ratio": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}}
    result = load_script("real_small_entropy").figure1(measured, "base", str(tmp_path))
    flags = [False, False, True, True, False, False]  # images 1..6
    for label, values in (("base, paper H/log V", measured["per_image"]["entropy_ratio"]),
                          ("base, length-free H/log V", measured["per_image"]["length_free_entropy_ratio"])):
        expected = entropy_hallucination_correlation(values, flags, measured["images"])
        assert result[label]["spearman"]["value"] == pytest.approx(expected["spearman"]["value"])
        assert result[label]["auc"]["value"] == pytest.approx(expected["auc"]["value"])
    assert result["base, paper H/log V"]["auc"]["value"] == pytest.approx(0.5)  # 0.4, 0.3 against 0.6..0.1
