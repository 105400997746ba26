"""Hostile checkpoint and weight files: another model size, foreign or missing keys, NaN / inf, code-executing
pickles, not safetensors, unknown suffixes, values beyond fp16; and non-finite logits while generating."""
from __future__ import annotations

import os
import pickle
import shlex
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from _hostile import Case, Env, Raises
from safetensors.torch import save_file

from minigpt4.models import checkpoints as ckpt
from minigpt4.models import released_weights
from minigpt4.models.checkpoints import CheckpointError
from minigpt4.models.numerics import NonFiniteLogitsError


def projector_file(width: int, llm_hidden: int, env: Env) -> None:
    path = env.tmp / "prerained_minigpt4.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(width, 16), "llama_proj.bias": torch.zeros(width)}}, path)
    released_weights.load_minigpt4_projector(torch.nn.Linear(16, llm_hidden), path, llm_hidden=llm_hidden)


def lavis_file_as_projector(env: Env) -> None:
    path = env.tmp / "blip2_pretrained_flant5xxl.pth"
    lavis = {"Qformer.bert.embeddings.LayerNorm.weight": torch.ones(4), "query_tokens": torch.zeros(1, 2, 4)}
    torch.save({"model": lavis}, path)
    released_weights.load_minigpt4_projector(torch.nn.Linear(4, 8), path, llm_hidden=8)


def trainable_file(source: str, target: str, edit: Callable[[dict], None], env: Env) -> list[str]:
    """A trainable.safetensors from a `source` projector model, edited, loaded into a `target` one."""
    tensors = {k: v.clone().contiguous() for k, v in ckpt.trainable_tensors(env.shared.model(source)).items()}
    edit(tensors)
    path = env.tmp / "final" / "trainable.safetensors"
    ckpt.save_state_file(path, tensors)
    return ckpt.load_trainable(env.shared.model(target), path)


def _set_nan(tensors: dict) -> None:
    tensors["projector.mu_p"][3] = float("nan")


class _ShellOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def code_executing_pickle(env: Env) -> None:
    marker = env.tmp / "ran"
    pickle.loads(pickle.dumps(_ShellOnUnpickle(marker)))  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    path = env.tmp / "prerained_minigpt4_7b.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(2, 2), "llama_proj.bias": _ShellOnUnpickle(marker)}}, path)
    ckpt.load_state_file(path)


def inf_in_pth(env: Env) -> None:
    torch.save({"model": {"llama_proj.weight": torch.tensor([[1.0, float("inf")]])}}, env.tmp / "proj.pth")
    ckpt.load_state_file(env.tmp / "proj.pth")


def not_safetensors(env: Env) -> None:
    (env.tmp / "trainable.safetensors").write_bytes(b"\x00\x01 this is not a safetensors header")
    ckpt.load_state_file(env.tmp / "trainable.safetensors")


def unknown_suffix(env: Env) -> None:
    (env.tmp / "model.ckpt").write_bytes(b"x")
    ckpt.load_state_file(env.tmp / "model.ckpt")


def full_ckpt_with_foreign_keys(env: Env) -> None:
    from minigpt4.models.loading import load_full_checkpoint

    save_file({"vision_tower.weight": torch.zeros(2)}, str(env.tmp / "full.safetensors"))
    load_full_checkpoint(env.shared.model("linear"), str(env.tmp / "full.safetensors"))


def built_with_projector_for_7b(env: Env) -> None:
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    path = env.tmp / "prerained_minigpt4_7b.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, 32), "llama_proj.bias": torch.zeros(4096)}}, path)
    build_model(tiny_model_config(env.shared.tokenizer_dir, "vib", projector_path=str(path)))


def _float64_with_1e300(key: str, tensors: dict) -> None:
    """Issue 13 item 3: finite in the file, inf once cast to the fp32 the model keeps it in."""
    for name in tensors:
        tensors[name] = tensors[name].double()
    tensors[key][0, 0] = 1e300


def released_projector_float64(env: Env) -> None:
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    weight, bias = torch.zeros(64, 32, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    weight[3, 1] = 1e300
    torch.save({"model": {"llama_proj.weight": weight, "llama_proj.bias": bias}}, env.tmp / "prerained_minigpt4.pth")
    projector_path = str(env.tmp / "prerained_minigpt4.pth")
    build_model(tiny_model_config(env.shared.tokenizer_dir, "vib", projector_path=projector_path))


def encoder_file_beyond_fp16(env: Env) -> None:
    """Assigned tensors keep the file's dtype and are cast by the builder afterwards (model.encoder_dtype)."""
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    state = {k: v.detach().clone().contiguous() for k, v in env.shared.model("vib").encoder.state_dict().items()}
    state["ln_vision.weight"][0] = 1e6  # fine in fp32, inf in fp16
    save_file(state, str(env.tmp / "encoder.safetensors"))
    build_model(tiny_model_config(env.shared.tokenizer_dir, "vib", encoder_path=str(env.tmp / "encoder.safetensors"),
                                  encoder_dtype="fp16"))


def nan_logits_while_generating(env: Env) -> list[str]:
    """Finite weights can still give NaN logits (an activation overflowing fp16): they must not decode to ""."""
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    model = build_model(tiny_model_config(env.shared.tokenizer_dir, "linear"))
    with torch.no_grad():  # what an overflow does downstream of finite weights
        model.projector.llama_proj.weight.fill_(float("inf"))
    return model.generate(["<ImageHere> Is there a dog?"], torch.zeros(1, 3, 28, 28), max_new_tokens=3)


BEYOND_FP32 = ("(torch.float64) has values up to 1e+300", "beyond the range of torch.float32", "would become inf")


CHECKPOINT_CASES = [    Case("checkpoint/projector/7b-file-13b-llm", partial(projector_file, 4096, 5120),
         Raises(CheckpointError, ("prerained_minigpt4.pth", "projector is 4096-wide: this is a 7B",
                                  "the LLM is 5120-wide (13B)"))),
    Case("checkpoint/projector/13b-file-7b-llm", partial(projector_file, 5120, 4096),
         Raises(CheckpointError, ("5120-wide: this is a 13B (Vicuna-13B / Llama-2-13B)", "4096-wide (7B)"))),
    Case("checkpoint/projector/70b-file-7b-llm", partial(projector_file, 8192, 4096),
         Raises(CheckpointError, ("8192-wide: this is a 65B/70B", "Llama-2-70B", "4096-wide (7B)"))),
    Case("checkpoint/projector/7b-file-tiny-model-via-builder", built_with_projector_for_7b,
         Raises(CheckpointError, ("{tmp}/prerained_minigpt4_7b.pth", "this is a 7B", "the LLM is 64-wide"))),
    Case("checkpoint/projector/lavis-file-given", lavis_file_as_projector,
         Raises(CheckpointError, ("blip2_pretrained_flant5xxl.pth", "looks like a LAVIS BLIP-2/EVA checkpoint, "
                                  "not a MiniGPT-4 projector"))),
    Case("checkpoint/trainable/missing-key", partial(trainable_file, "vib", "vib", lambda t: t.pop("projector.mu_p")),
         Raises(CheckpointError, ("{tmp}/final/trainable.safetensors", "1 trainable parameter(s) not in the file: "
                                  "projector.mu_p"))),
    Case("checkpoint/trainable/extra-key",
         partial(trainable_file, "vib", "vib", lambda t: t.update({"projector.rotary.weight": torch.ones(2)})),
         Raises(CheckpointError, ("1 key(s) the model does not have: projector.rotary.weight",))),
    Case("checkpoint/trainable/wrong-shape",
         partial(trainable_file, "vib", "vib", lambda t: t.update({"projector.mu_p": torch.zeros(5120)})),
         Raises(CheckpointError, ("shape mismatch", "projector.mu_p: checkpoint (5120,) vs model (64,)"))),
    Case("checkpoint/trainable/nan-values", partial(trainable_file, "vib", "vib", _set_nan),
         Raises(CheckpointError, ("trainable.safetensors", "tensor 'projector.mu_p' contains NaN or inf"))),
    Case("checkpoint/trainable/linear-file-into-vib-model", partial(trainable_file, "linear", "vib", lambda t: None),
         Raises(CheckpointError, ("projector.llama_proj_std.weight", "the file holds a linear projector",
                                  "model.mm_projector_type: linear"))),
    Case("checkpoint/trainable/vib-file-into-linear-model", partial(trainable_file, "vib", "linear", lambda t: None),
         Raises(CheckpointError, ("the file holds a VIB projector", "model.mm_projector_type: vib"))),
    Case("checkpoint/pth/inf-values", inf_in_pth, Raises(CheckpointError, ("proj.pth", "'llama_proj.weight'",
                                                                           "NaN or inf"))),
    Case("checkpoint/pth/code-executing-pickle", code_executing_pickle,
         Raises(CheckpointError, ("prerained_minigpt4_7b.pth is not a plain tensor checkpoint",
                                  "nothing was executed"), after=lambda env: not (env.tmp / "ran").exists())),
    Case("checkpoint/file/not-safetensors", not_safetensors,
         Raises(CheckpointError, ("{tmp}/trainable.safetensors: not a readable safetensors file",))),
    Case("checkpoint/file/unknown-suffix", unknown_suffix,
         Raises(CheckpointError, ("model.ckpt: unknown checkpoint type '.ckpt'",))),
    Case("checkpoint/full/foreign-keys", full_ckpt_with_foreign_keys,
         Raises(CheckpointError, ("full.safetensors", "unexpected keys outside encoder/llm/projector",
                                  "vision_tower.weight"))),
    # values that become inf in the dtype the model keeps them in (issue 13 item 3): refused, naming the tensor
    Case("checkpoint/trainable/float64-beyond-fp32",
         partial(trainable_file, "vib", "vib", partial(_float64_with_1e300, "projector.llama_proj.weight")),
         Raises(CheckpointError, ("{tmp}/final/trainable.safetensors", "'projector.llama_proj.weight'", *BEYOND_FP32))),
    Case("checkpoint/projector/float64-beyond-fp32-via-builder", released_projector_float64,
         Raises(CheckpointError, ("{tmp}/prerained_minigpt4.pth", "'llama_proj.weight'", *BEYOND_FP32))),
    Case("checkpoint/encoder/beyond-fp16-after-cast", encoder_file_beyond_fp16,
         Raises(CheckpointError, ("not finite after loading them in the dtypes it runs in", "encoder.ln_vision.weight "
                                  "(float16)", "model.encoder_path = {tmp}/encoder.safetensors", "65504"))),
    Case("checkpoint/model/nan-logits-while-generating", nan_logits_while_generating,
         Raises(NonFiniteLogitsError, ("non-finite logits (NaN/inf) at generated token 1 for batch row(s) [0]",
                                       "would decode to empty strings"))),
]
