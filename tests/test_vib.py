"""Every VIB function against an independent computation (minigpt4/models/vib.py)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from minigpt4.common.config import ConfigError, VIBConfig
from minigpt4.models.vib import (
    LinearProjector,
    VIBProjector,
    adaptive_weight,
    gaussian_kl,
    pool_tokens,
    similarity_entropy,
)


def test_pool_tokens_is_sum_over_sqrt_length():
    h = torch.randn(2, 5, 3)
    assert torch.allclose(pool_tokens(h), h.sum(1) / math.sqrt(5))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    pooled = pool_tokens(h, mask)
    assert torch.allclose(pooled[0], (h[0, 0] + h[0, 1]) / math.sqrt(2))
    assert torch.allclose(pooled[1], h[1].sum(0) / math.sqrt(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_kl_matches_torch_distributions(dtype):
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(4, 16, generator=g), torch.randn(16, generator=g)
    std_q = torch.rand(4, 16, generator=g) + 0.1
    std_p = torch.rand(16, generator=g) + 0.1
    args = [t.to(dtype) for t in (mu_q, std_q, mu_p, std_p)]
    ours = gaussian_kl(*args)
    assert ours.dtype == torch.float32 and ours.shape == (4,)
    ref = kl_divergence(Normal(*(t.double() for t in args[:2])), Normal(*(t.double() for t in args[2:]))).sum(-1)
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_gaussian_kl_is_zero_for_equal_and_finite_for_collapsed_std():
    mu, std = torch.randn(8), torch.rand(8) + 0.5
    assert gaussian_kl(mu, std, mu, std).abs().item() < 1e-5
    collapsed = gaussian_kl(mu, torch.zeros(8), torch.zeros(8), torch.ones(8))
    assert torch.isfinite(collapsed) and collapsed > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_similarity_entropy_matches_hand_softmax(dtype):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(3, 2, 8, generator=g).to(dtype).requires_grad_(dtype == torch.float32)
    emb = torch.randn(50, 8, generator=g).to(dtype)
    h = similarity_entropy(u, emb, chunk_size=2)
    assert h.shape == (3, 2) and h.dtype == torch.float32 and not h.requires_grad
    logits = u.detach().double() @ emb.double().T
    p = torch.exp(logits - torch.logsumexp(logits, -1, keepdim=True))
    ref = -(p * torch.log(p + 1e-8)).sum(-1)
    assert torch.allclose(h.double(), ref, atol=1e-5)
    assert (h >= 0).all() and (h <= math.log(50) + 1e-5).all()


def test_similarity_entropy_in_fp32_under_autocast():
    u, emb = torch.randn(2, 8), torch.randn(40, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = similarity_entropy(u, emb)
    assert h.dtype == torch.float32
    assert torch.allclose(h, similarity_entropy(u, emb))


def test_adaptive_weight_ends_and_middle():
    v = 1000
    log_v = math.log(v)
    alpha = adaptive_weight(torch.tensor([0.0, log_v, 0.5 * log_v, 2 * log_v]), v)
    assert torch.isfinite(alpha).all()
    assert alpha[0].item() == pytest.approx(-math.log(1e-6), rel=1e-5)  # H = 0: largest, finite
    assert alpha[1].item() == pytest.approx(0.0, abs=1e-7)  # uniform: no extra pull
    assert alpha[2].item() == pytest.approx(math.log(2), rel=1e-6)
    assert alpha[3].item() == pytest.approx(0.0, abs=1e-7)  # above log V (numerical): clamped
    weird = adaptive_weight(torch.tensor([float("nan"), float("inf"), -float("inf"), -1.0]), v)
    assert torch.isfinite(weird).all()
    bf = adaptive_weight(torch.tensor([0.25 * log_v], dtype=torch.bfloat16), v)
    assert bf.dtype == torch.float32 and bf.item() == pytest.approx(math.log(4), rel=1e-2)


def _projector(**settings):
    torch.manual_seed(0)
    return VIBProjector(6, 8, VIBConfig(**settings))


# Written out by hand, without the module's own pool_tokens / gaussian_kl, so a bug in either cannot also be in the
# reference the projector's loss terms are checked against.
def _sum_over_sqrt_length(h: torch.Tensor) -> torch.Tensor:
    """(B, N, d) -> (B, d): the tokens added up one by one, divided by √N."""
    total = h[:, 0]
    for i in range(1, h.shape[1]):
        total = total + h[:, i]
    return total / math.sqrt(h.shape[1])


def _kl_to_prior(mu_q: torch.Tensor, std_q: torch.Tensor, mu_p: torch.Tensor, std_p: torch.Tensor) -> torch.Tensor:
    """KL(N(μq, σq²) || N(μp, σp²)) of diagonal Gaussians in closed form, summed over the last axis:
    Σ_j log(σp/σq) + (σq² + (μq − μp)²) / (2σp²) − 1/2."""
    ratio = std_p.log() - std_q.log()
    return (ratio + (std_q ** 2 + (mu_q - mu_p) ** 2) / (2 * std_p ** 2) - 0.5).sum(-1)


def test_vib_training_samples_are_sample_major():
    proj = _projector(num_samples=3, beta=0.5).train()
    q, emb = torch.randn(2, 3, 6), torch.randn(20, 8)
    torch.manual_seed(123)
    z, info = proj(q, embed_weight=emb)
    assert z.shape == (6, 3, 8)
    mu = proj.llama_proj(q)
    std = torch.nn.functional.softplus(proj.llama_proj_std(q))
    torch.manual_seed(123)
    eps = torch.randn(3, 2, 3, 8)
    for s in range(3):
        for b in range(2):
            assert torch.allclose(z[s * 2 + b], mu[b] + std[b] * eps[s, b], atol=1e-6)
    assert info["kl"].shape == (2,) and info["alpha"].shape == (2,)


def test_vib_loss_terms_match_equations():
    proj = _projector(num_samples=2, beta=0.5, adaptive=True).train()
    q, emb = torch.randn(2, 3, 6), torch.randn(20, 8)
    torch.manual_seed(5)
    z, info = proj(q, embed_weight=emb)
    mu, std = proj.llama_proj(q), torch.nn.functional.softplus(proj.llama_proj_std(q))
    kl_ref = _kl_to_prior(_sum_over_sqrt_length(mu), _sum_over_sqrt_length(std), proj.mu_p,
                          torch.nn.functional.softplus(proj.std_p))
    assert torch.allclose(info["kl"], kl_ref, rtol=1e-5)
    h = similarity_entropy(_sum_over_sqrt_length(z), emb).reshape(2, 2)
    alpha_ref = (-torch.log(h / math.log(20))).mean(0)
    assert torch.allclose(info["alpha"], alpha_ref, atol=1e-6)
    assert torch.allclose(info["kl_term"], 0.5 * (alpha_ref * kl_ref).mean(), rtol=1e-5)
    _, fixed = _projector(num_samples=2, beta=0.5, adaptive=False).train()(q, embed_weight=emb)  # same weights
    assert torch.equal(fixed["kl"], info["kl"]) and torch.allclose(fixed["kl_term"], 0.5 * fixed["kl"].mean())
    assert info["kl_term"].requires_grad


def test_vib_inference_is_the_mean_head():
    proj = _projector(num_samples=3).eval()
    q = torch.randn(2, 3, 6)
    z, _ = proj(q)
    assert torch.equal(z, proj.llama_proj(q))


def test_vib_without_reparameterization_uses_mean_in_training():
    proj = _projector(reparameterize=False, num_samples=3, beta=1.0).train()
    q = torch.randn(2, 3, 6)
    z, info = proj(q)
    assert torch.equal(z, proj.llama_proj(q))
    assert info["kl_term"] > 0


def test_vib_per_token_kl_option():
    proj = _projector(kl_on="token").eval()
    q = torch.randn(2, 3, 6)
    _, info = proj(q)
    mu, std = proj.llama_proj(q), torch.nn.functional.softplus(proj.llama_proj_std(q))
    ref = kl_divergence(Normal(mu, std), Normal(proj.mu_p, torch.nn.functional.softplus(proj.std_p))).sum((-1, -2))
    assert torch.allclose(info["kl"], ref, rtol=1e-5)


def test_linear_projector_has_the_released_key_names():
    proj = LinearProjector(6, 8)
    assert set(proj.state_dict()) == {"llama_proj.weight", "llama_proj.bias"}
    vib = VIBProjector(6, 8)
    assert {"llama_proj.weight", "llama_proj.bias", "llama_proj_std.weight", "mu_p", "std_p"} <= set(vib.state_dict())


def test_vib_functions_keep_fp64_and_equal_a_float64_computation():
    """fp64 in, fp64 math: nothing is lowered to fp32 on the way (fp16/bf16 are still promoted to fp32)."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 7, 16, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(3, 7, generator=g) > 0.3).double()
    mask[:, 0] = 1
    pooled = pool_tokens(h, mask)
    expected = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).sqrt()
    assert pooled.dtype == torch.float64 and (pooled - expected).abs().max() < 1e-12

    mu_q, mu_p = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    std_q = torch.rand(3, 16, generator=g, dtype=torch.float64) + 1e-3
    std_p = torch.rand(16, generator=g, dtype=torch.float64) + 1e-3
    kl = gaussian_kl(mu_q, std_q, mu_p, std_p)
    ref = kl_divergence(Normal(mu_q, std_q), Normal(mu_p, std_p)).sum(-1)
    assert kl.dtype == torch.float64 and ((kl - ref).abs() / ref.abs().clamp_min(1.0)).max() < 1e-12

    emb = torch.randn(300, 16, generator=g, dtype=torch.float64)
    entropy = similarity_entropy(pooled, emb, chunk_size=2)
    p = torch.softmax(pooled @ emb.T, dim=-1)
    ref_h = -(p * torch.log(p + 1e-8)).sum(-1)
    assert entropy.dtype == torch.float64 and (entropy - ref_h).abs().max() < 1e-12

    alpha = adaptive_weight(entropy, 300)
    ref_alpha = -torch.log((ref_h / math.log(300)).clamp(1e-6, 1.0))
    assert alpha.dtype == torch.float64 and (alpha - ref_alpha).abs().max() < 1e-12
    for low in (torch.float16, torch.bfloat16):  # half precision is still promoted to fp32
        assert pool_tokens(h.to(low)).dtype == gaussian_kl(*(t.to(low) for t in (mu_q, std_q, mu_p, std_p))).dtype \
            == similarity_entropy(pooled.to(low), emb.to(low)).dtype == adaptive_weight(entropy.to(low), 300).dtype \
            == torch.float32


def test_vib_projector_in_fp64_reports_fp64_statistics():
    torch.manual_seed(0)
    proj = VIBProjector(8, 6, VIBConfig(num_samples=2, beta=0.5, adaptive=True)).double().train()
    q = torch.randn(2, 5, 8, dtype=torch.float64)
    emb = torch.randn(40, 6, dtype=torch.float64)
    z, info = proj(q, embed_weight=emb)
    mu, std = proj.llama_proj(q), F.softplus(proj.llama_proj_std(q))
    expected_kl = _kl_to_prior(_sum_over_sqrt_length(mu), _sum_over_sqrt_length(std), proj.mu_p, F.softplus(proj.std_p))
    assert z.dtype == info["kl"].dtype == info["alpha"].dtype == info["kl_term"].dtype == torch.float64
    assert (info["kl"] - expected_kl).abs().max() < 1e-12
    alpha = adaptive_weight(similarity_entropy(_sum_over_sqrt_length(z.detach()), emb), 40).reshape(2, 2).mean(0)
    assert abs(info["kl_term"].item() - 0.5 * (alpha * expected_kl).mean().item()) < 1e-12


def test_vib_projector_owns_its_settings_and_refuses_bad_ones_naming_the_key():
    assert VIBProjector(6, 8).config == VIBConfig()  # no settings given: the reference recipe (β 1e-7, S 3)
    for settings, message in [(dict(kl_on="joint"), "model.vib.kl_on = 'joint'; expected one of pooled, token"),
                              (dict(num_samples=0), "model.vib.num_samples must be >= 1, got 0"),
                              (dict(beta=-1.0), "model.vib.beta must be >= 0 and finite, got -1.0")]:
        with pytest.raises(ConfigError, match=message):
            VIBProjector(6, 8, VIBConfig(**settings))


def test_a_call_may_ask_for_another_number_of_samples():
    """S comes from the config; `num_samples` in a call overrides it (the benchmark's one-sample passes)."""
    proj = _projector(num_samples=3).train()
    q = torch.randn(2, 3, 6)
    assert proj(q)[0].shape[0] == 6 and proj(q, num_samples=1)[0].shape[0] == 2
    assert proj.eval()(q, num_samples=3)[0].shape[0] == 2  # inference never samples
