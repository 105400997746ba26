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
    CheckSettings, adjust_random_model, build_phase, generation_phase, make_caption, phase_costs, training_phase,
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
    assert expected["train"]["llm"] == 4 * planned["shapes"].llm_params * 3 * planned["lengths"].train_length
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


def test_random_llm_weights_are_drawn_once(tiny_tokenizer_dir):
    """The builder's random LLM is initialised by one pass of transformers' init, not torch's resets first."""
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    cfg = tiny_model_config(tiny_tokenizer_dir, "vib", llm_dtype="auto", encoder_dtype="auto", precision="bf16")
    fills: dict[int, int] = {}

    class Fills(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            target = args[0] if args else None
            if str(func.overloadpacket) in ("aten.normal_", "aten.uniform_") and not target.is_meta:
                fills[target.untyped_storage().data_ptr()] = fills.get(target.untyped_storage().data_ptr(), 0) + 1
            return func(*args, **(kwargs or {}))

    with Fills():
        model = build_model(cfg)
    llm_weights = [p.untyped_storage().data_ptr() for p in model.llm.parameters() if p.dim() == 2]
    assert llm_weights and all(fills.get(ptr) == 1 for ptr in llm_weights)


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
