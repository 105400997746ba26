"""scripts/fullsize_check.py at the tiny size (the same code as the 7B run, in seconds), the cost formulas against
torch's own FLOP counter and autograd's saved tensors, and the full-size fixes it found: one random draw per
weight in its own dtype, no fp32 copy of the embedding table in the entropy, one mm for the generation LM head,
a one-pass finiteness check. No timing is asserted: at this size the ratios mean nothing."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from minigpt4.benchmarking import costs, fullsize_run, hardware
from minigpt4.benchmarking.fullsize import (
    CheckSettings,
    adjust_random_model,
    build_phase,
    generation_phase,
    make_caption,
    phase_costs,
    training_phase,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _script():
    spec = importlib.util.spec_from_file_location("fullsize_check_script", REPO / "scripts" / "fullsize_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("arch", ["minigpt4", "llava15"])
def test_tiny_run_reports_every_phase(tmp_path, arch, restore_threads):
    out = tmp_path / "fullsize.json"
    _script().main(["--size", "tiny", "--arch", arch, "--threads", "1", "--out", str(out),
                    "--workdir", str(tmp_path / "work")])
    report = json.loads(out.read_text())
    assert report["memory_line"].startswith("memory: the peak (training) needs") and report["memory_fits"]
    assert report["machine"]["torch_threads"] == 1 and len(report["load_average_before"]) == 3
    for key in ("calibration_start", "calibration_end"):
        assert report[key]["matmul"]["tflops_best"] > 0 and report[key]["copy"]["gbps_best"] > 0
    train = report["phases"]["train"]
    assert math.isfinite(train["loss"]) and train["grad_norm"] > 0
    assert train["forward_s"] > 0 and train["backward_s"] > 0 and train["encoder_s"] > 0
    lengths = report["lengths"]
    assert lengths["caption_target"] == 101  # the 100-token caption + the end string
    assert len(report["phases"]["pope"]["decode_step_s"]) == 9 and len(report["phases"]["chair"]["decode_step_s"]) == 31
    rows = report["rows"]
    for name in ("train", "pope", "chair"):
        assert rows[name]["peak_bytes"] > 0 and rows[name]["model_bytes"] > 0
        assert "of self time" in rows[name]["bound_by"]
        assert (tmp_path / f"fullsize_{name}_profile.txt").read_text().count("self_cpu_time_total") == 1
    assert 0 < rows["train"]["of_matmul"] and 0 < rows["pope"]["decode_of_copy"] and rows["chair"]["prefill_tflops"] > 0
    # Autograd's saved tensors, counted by hooks during the run, are what the memory model says they are.
    assert abs(rows["train"]["saved_for_backward_vs_model"]) < 0.02
    assert len(report["targets"]) == 9 and all(isinstance(v, bool) for v in report["targets"].values())
    table = out.with_suffix(".md").read_text()
    assert "| phase | wall s |" in table and "decode (31 steps, median)" in table and "Memory model" in table


def test_not_enough_memory_stops_before_building(tmp_path, monkeypatch, capsys, restore_threads):
    monkeypatch.setattr(hardware, "available_bytes", lambda device: 1000)
    built = []
    monkeypatch.setattr(fullsize_run, "build_phase", lambda *a, **k: built.append(1))
    out = tmp_path / "fullsize.json"
    with pytest.raises(SystemExit) as stop:
        _script().main(["--size", "tiny", "--threads", "1", "--out", str(out), "--workdir", str(tmp_path / "w")])
    assert stop.value.code == 2 and not built and not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("error: memory: the peak (training) needs") and "does NOT fit" in err


@pytest.fixture(scope="module", params=["minigpt4", "llava15"])
def tiny_check(request, tmp_path_factory):
    settings = CheckSettings(arch=request.param, size="tiny", profile=False)
    workdir = tmp_path_factory.mktemp(f"fullsize_{request.param}")
    planned = fullsize_run.plan(settings, workdir, CPU)
    model, _ = build_phase(planned["cfg"], CPU)
    adjust_random_model(model, settings, planned["tokenizer_len"])
    return settings, planned, model, workdir


def _matmul_flops(counter: FlopCounterMode) -> int:
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm", "convolution"))


def test_flop_formulas_match_torch_flop_counter(tiny_check):
    """costs.py's model FLOPs are exactly the matrix products torch runs: training (4·N for the frozen LLM) and a
    batch-1 generation (prefill with the LM head on the last position only, then the decode steps)."""
    settings, planned, model, workdir = tiny_check
    expected = phase_costs(planned["shapes"], planned["lengths"], settings)
    with FlopCounterMode(display=False) as counter:
        training_phase(model, settings, planned["inputs"], CPU)
    assert _matmul_flops(counter) == expected["train"]["total"]
    shapes, lengths = planned["shapes"], planned["lengths"]  # the LM head runs at the answer positions only
    assert expected["train"]["llm"] == 4 * 3 * (shapes.llm_decoder_params * lengths.train_length
                                                 + shapes.llm_head_params * lengths.caption_target)
    inputs = planned["inputs"]
    with FlopCounterMode(display=False) as counter:
        generation_phase(model, "chair", [inputs.chair_prompt], settings.chair_new_tokens, settings, inputs, workdir,
                         CPU)
    assert _matmul_flops(counter) == expected["chair"]["total"]


def test_built_model_is_its_plan_in_bf16(tiny_check):
    settings, planned, model, _ = tiny_check
    assert costs.read_shapes(model) == planned["shapes"]
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.projector.parameters()} == {torch.float32}
    # RoPE's frequencies stay fp32, as transformers computes them (a cast model would round them to bf16).
    assert model.llm.model.rotary_emb.inv_freq.dtype == torch.float32


class OpLog(TorchDispatchMode):
    """Every aten op run inside, with its outputs' dtype and size."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.calls.append((str(func.overloadpacket), [(o.dtype, o.numel()) for o in outs
                                                      if isinstance(o, torch.Tensor)]))
        return out


class RandomFills(TorchDispatchMode):
    """How many times each storage was filled with random numbers (normal_ / uniform_: every torch and
    transformers init draw goes through one of them) inside the block."""

    def __init__(self):
        super().__init__()
        self.by_storage: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        target = args[0] if args else None
        if str(func.overloadpacket) in ("aten.normal_", "aten.uniform_") and not target.is_meta:
            ptr = target.untyped_storage().data_ptr()
            self.by_storage[ptr] = self.by_storage.get(ptr, 0) + 1
        return func(*args, **(kwargs or {}))

    def count(self, tensor: torch.Tensor) -> int:
        return self.by_storage.get(tensor.untyped_storage().data_ptr(), 0)


def test_random_llm_weights_are_drawn_once(tiny_tokenizer_dir):
    """The builder's random LLM is initialised by one pass of transformers' init, not torch's resets first."""
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    cfg = tiny_model_config(tiny_tokenizer_dir, "vib", llm_dtype="auto", encoder_dtype="auto", precision="bf16")
    with RandomFills() as fills:
        model = build_model(cfg)
    llm_weights = [p for p in model.llm.parameters() if p.dim() == 2]
    assert llm_weights and all(fills.count(p) == 1 for p in llm_weights)


def test_random_minigpt4_encoder_is_drawn_once_with_transformers_init(tiny_tokenizer_dir):
    """EVA ViT + Q-Former without weight files: every matrix drawn exactly once (not by torch's reset and
    then by transformers' init), biases zeroed without a draw, and the values are transformers' init: the
    std of the Linear weights is each part's initializer_range (1e-10 for Blip2VisionConfig, 0.02 for the
    Q-Former), as the query tokens' (LAVIS: 0.02)."""
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)
    with RandomFills() as fills:
        model = build_model(tiny_model_config(tiny_tokenizer_dir, "vib", precision="bf16"))
    encoder = model.encoder
    drawn = {name: fills.count(p) for name, p in encoder.named_parameters()}
    assert max(drawn.values()) == 1, {name: n for name, n in drawn.items() if n > 1}
    assert all(drawn[name] == 1 for name, p in encoder.named_parameters() if p.dim() >= 2)
    assert all(drawn[name] == 0 for name, _ in encoder.named_parameters() if name.endswith("bias"))
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}  # materialised in the dtype it runs in
    for part in (encoder.vision_model, encoder.qformer):
        weights = torch.cat([m.weight.detach().float().flatten() for m in part.modules()
                             if isinstance(m, torch.nn.Linear)])
        assert weights.std().item() == pytest.approx(part.config.initializer_range, rel=0.1)
        biases = [m.bias for m in part.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
        assert biases and all(not b.any() for b in biases)
    assert encoder.query_tokens.float().std().item() == pytest.approx(0.02, rel=0.25)
    assert torch.equal(encoder.ln_vision.weight, torch.ones_like(encoder.ln_vision.weight))


def test_random_llava_encoder_is_drawn_by_transformers_init_alone(tiny_tokenizer_dir):
    """LLaVA's CLIP tower is drawn only by transformers' init (the same draws as one init_weights pass on
    an empty tower, none by torch's resets). CLIP's own init re-draws its Linear/Conv/Embedding weights after
    the generic pass over them, hence two draws for those in transformers' pass alone; its fc1 std is
    CLIP's (2 · width)^-0.5, not the generic initializer_range."""
    from test_llava import tiny_llava_config
    from transformers import CLIPVisionModel

    from minigpt4.models.from_config import build_model

    with RandomFills() as fills:
        model = build_model(tiny_llava_config(tiny_tokenizer_dir, "vib"))
    tower = model.encoder.vision_tower
    with torch.device("meta"):
        empty = CLIPVisionModel(tower.config)
    empty.to_empty(device=CPU)
    with RandomFills() as alone:
        empty.init_weights()
    expected = {name: alone.count(p) for name, p in empty.named_parameters()}
    assert {name: fills.count(p) for name, p in tower.named_parameters()} == expected
    fc1 = torch.cat([layer.mlp.fc1.weight.detach().flatten() for layer in tower.encoder.layers])
    assert fc1.std().item() == pytest.approx((2 * tower.config.hidden_size) ** -0.5, rel=0.1)


@pytest.mark.parametrize("arch", ["minigpt4", "llava15"])
def test_random_build_leaves_no_tensor_uninitialised(tiny_tokenizer_dir, monkeypatch, arch):
    """Storage from to_empty is whatever memory held: poisoned with NaN here, every float tensor must have
    been written by an init (the builder's finiteness check refuses the model otherwise)."""
    from test_llava import tiny_llava_config
    from torch import nn

    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    to_empty = nn.Module.to_empty

    def poisoned(module, *, device, recurse=True):
        module = to_empty(module, device=device, recurse=recurse)
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data.fill_(float("nan") if tensor.is_floating_point() else -1)
        return module

    monkeypatch.setattr(nn.Module, "to_empty", poisoned)
    make_config = tiny_model_config if arch == "minigpt4" else tiny_llava_config
    model = build_model(make_config(tiny_tokenizer_dir, "vib"))
    assert all(t.is_floating_point() or not (t == -1).any() for t in [*model.parameters(), *model.buffers()])


def test_entropy_never_casts_the_whole_table():
    from minigpt4.models.vib import similarity_entropy

    gen = torch.Generator().manual_seed(0)
    table = torch.randn(3000, 64, generator=gen).to(torch.bfloat16)
    u = torch.randn(6, 64, generator=gen)
    with OpLog() as log:
        entropy = similarity_entropy(u, table, vocab_chunk=512)
    largest = max(n for _, outs in log.calls for dtype, n in outs if dtype == torch.float32)
    assert largest < table.numel() // 4  # one 512-row slice in fp32, never all 3,000 rows
    p = torch.softmax(u @ table.float().T, dim=-1)
    assert torch.allclose(entropy, -(p * torch.log(p + 1e-8)).sum(-1), rtol=1e-5, atol=1e-5)


def test_generation_lm_head_is_one_matrix_product(tiny_check):
    """transformers' hidden[:, -1:] slice of a batch would make the LM head a bmm over a copied, expanded head."""
    _, _, model, _ = tiny_check
    hidden = torch.randn(2, 7, model.llm.config.hidden_size, dtype=torch.bfloat16)
    head = model.llm.get_output_embeddings()
    with OpLog() as log, torch.no_grad():
        logits = head(hidden[:, -1:])
    ops = {name for name, _ in log.calls}
    assert "aten.bmm" not in ops and "aten.mm" in ops
    assert torch.equal(logits, head(hidden[:, -1:].clone()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_sees_nan_and_both_infinities(dtype):
    from minigpt4.models.numerics import all_finite

    tensor = torch.randn(50, 40).to(dtype)
    assert all_finite(tensor)
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = tensor.clone()
        broken[31, 7] = bad
        assert not all_finite(broken)


def test_caption_has_exactly_the_asked_tokens(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from minigpt4.models.tokenization import SegmentTokenizer

    segments = SegmentTokenizer(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    for tokens in (1, 37, 100):
        assert len(segments.encode(make_caption(segments, tokens, seed=3))) == tokens
