"""Typed configuration: omegaconf structured configs merged in one documented order, validated early.

Merge order (later wins): schema defaults (model, run, eval) < dataset builder defaults < the recipe YAML
< `--options key=value ...` from the command line. Structured configs make unknown keys and wrong types
errors that name the key; `check_paths` then verifies every weight/data path exists — all before any model
is built.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minigpt4.common.jsonfiles import DataFileError, read_text


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message names the key."""


@dataclass
class VIBConfig:
    """`model.vib`: every setting of the VIB method, in one place. The builders hand it whole to
    `models.vib.VIBProjector`, which owns it: YAML -> this object -> the projector's sampling and KL term."""

    num_samples: int = 3  # S noise samples per image in training (reference 3)
    beta: float = 1e-7  # KL weight (reference 1e-7)
    adaptive: bool = True  # AdaVIB: weight each image's KL by α = -log(H / log V)
    kl_on: str = "pooled"  # pooled (reference) | token
    reparameterize: bool = True  # false: z = μ in training, KL kept (ablation)
    std_head: str = "same"  # LLaVA only: same (MLP like the mean head) | linear
    # What α's entropy is taken of. pooled: the paper's H(softmax(u·Eᵀ)), u = Σμ/√N (the default, exact).
    # length_free: NOT the paper's; an ablation (issue 23): u rescaled to the mean word-embedding length first, so
    # H measures u's direction only (a real LLM's u is far longer than any word embedding: models/vib.py).
    entropy_of: str = "pooled"

    def validate(self, prefix: str = "model.vib") -> None:
        """What the types cannot say; ConfigError naming `prefix.key`."""
        for key, valid in (("kl_on", ("pooled", "token")), ("std_head", ("same", "linear")),
                           ("entropy_of", ("pooled", "length_free"))):
            if getattr(self, key) not in valid:
                raise ConfigError(f"{prefix}.{key} = {getattr(self, key)!r}; expected one of {', '.join(valid)}")
        if self.num_samples < 1:
            raise ConfigError(f"{prefix}.num_samples must be >= 1, got {self.num_samples}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"{prefix}.beta must be >= 0 and finite, got {self.beta}")


@dataclass
class ModelConfig:
    arch: str = "minigpt4"  # minigpt4 | llava15
    # --- weights (local paths only; all null = random init, how tests build tiny models) ---
    encoder_path: Optional[str] = None  # converted encoder.safetensors (scripts/convert_lavis_checkpoint.py)
    vit_path: Optional[str] = None  # LAVIS eva_vit_g.pth
    qformer_path: Optional[str] = None  # LAVIS blip2_pretrained_flant5xxl.pth
    blip2_hf_path: Optional[str] = None  # local Hugging Face BLIP-2 snapshot folder (vision, Q-Former, queries)
    llm_path: Optional[str] = None  # Vicuna / Llama-2 folder in Hugging Face format
    tokenizer_path: Optional[str] = None  # defaults to llm_path
    projector_path: Optional[str] = None  # MiniGPT-4 projector, e.g. prerained_minigpt4_7b.pth; llava15: the μ head
    #   from an original-release mm_projector.bin or a llava-hf folder (overrides the one in llava_path)
    llava_path: Optional[str] = None  # llava15: local llava-hf folder (CLIP tower, projector, Vicuna-1.5, tokenizer)
    ckpt: Optional[str] = None  # this project's trainable.safetensors (fine-tuned projector)
    full_ckpt: Optional[str] = None  # whole-model safetensors (the embedded tiny shapes-world model)
    cnn_path: Optional[str] = None  # visual_tokens cnn_grid: a transformers EfficientNet folder
    #   (weights/small/efficientnet-lite0 from scripts/get_small_backbones.sh)
    # --- architecture (used for random init and checked against loaded weights) ---
    vision: dict[str, Any] = field(default_factory=dict)  # overrides of encoders.EVA_VIT_G (llava15: CLIP_VIT_L_336)
    qformer: dict[str, Any] = field(default_factory=dict)  # overrides of encoders.QFORMER_BASE
    llm_preset: Optional[str] = None  # vicuna-7b | vicuna-13b | llama2-7b | llama2-13b (random init sizes);
    #   llava15: vicuna-7b-v1.5 | vicuna-13b-v1.5
    llm: dict[str, Any] = field(default_factory=dict)  # LlamaConfig overrides for random init
    num_query_tokens: int = 32
    # qformer: the 32 BLIP-2 Q-Former queries (MiniGPT-4 with Vicuna) | vit_patch4: no Q-Former, each 4 consecutive
    #   ViT patch tokens concatenated, 64 × 4·1408 (MiniGPT-4's Llama-2 variant; reads only model.vit_path)
    #   | cnn_grid: a pretrained CNN's final feature map, one token per position (7 × 7 × 1280 at 224 px;
    #   model.cnn_path, models/cnn_encoder.py); model.vision then overrides models/small_backbones.py lite0_config
    visual_tokens: str = "qformer"
    grid_group: int = 1  # cnn_grid: consecutive positions concatenated into one token (1: 49 tokens; 7: one per row)
    # --- the method ---
    mm_projector_type: str = "vib"  # linear | vib
    vib: VIBConfig = field(default_factory=VIBConfig)
    # --- prompts ---
    prompt_template: str = "vicuna_v0"  # vicuna_v0 | llama2 | plain | llava15 | llava15
    end_sym: Optional[str] = None  # defaults to the template's
    max_txt_len: int = 512
    # --- precision / speed ---
    # auto | fp32 | bf16 | reference (MiniGPT-4/AdaVIB: ViT Linear/Conv fp16, Q-Former + projector fp32, LLM fp16,
    #   fp16 autocast, GradScaler in training); the table is in minigpt4/models/precision.py
    precision: str = "auto"
    llm_dtype: str = "auto"  # precision auto only: auto (bf16 on GPU, fp32 on CPU) | fp32 | fp16 | bf16
    encoder_dtype: str = "auto"  # precision auto only; same choices
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    low_resource: bool = False  # 8-bit LLM via bitsandbytes (GPU only)
    encoder_device: Optional[str] = None  # null: with the LLM; cpu: ViT + Q-Former on the CPU (24 GB cards)


DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "reference")
# The run.amp each precision trains under (auto: whatever run.amp says).
TRAINING_AMP = {"fp32": "none", "bf16": "bf16", "reference": "fp16"}
PATH_KEYS = ("encoder_path", "vit_path", "qformer_path", "blip2_hf_path", "llm_path", "tokenizer_path",
             "projector_path", "ckpt", "full_ckpt", "llava_path", "cnn_path")
# Weight sources that only one architecture reads: set for the other one, they would be silently unused.
MINIGPT4_ONLY_KEYS = ("encoder_path", "vit_path", "qformer_path", "blip2_hf_path", "llm_path", "cnn_path")
LLAVA_ONLY_KEYS = ("llava_path",)


def merge(schema: Any, *layers: Any, options: list[str] | None = None, where: str = "config",
          allow_missing: bool = False) -> DictConfig:
    """schema defaults < layers (dicts, DictConfigs or YAML paths) < dotlist options; unknown keys and wrong
    types raise ConfigError naming the key and, for unknown keys, the valid ones.

    A `???` left in the layers (a path the user must supply) is an error naming every such key, unless
    `allow_missing` (shape-only tools). It is checked on the layers themselves: merging `???` into a schema
    field that has a default would silently keep the default.
    """
    cfg = OmegaConf.structured(schema)
    plain = OmegaConf.create()
    shape = OmegaConf.to_container(cfg, resolve=False)  # which keys hold mappings (sections, sub-sections)
    try:
        for layer in layers:
            source = where
            if isinstance(layer, (str, os.PathLike)):
                source, layer = str(layer), load_yaml(layer)
            check_sections(shape, layer, source)
            cfg = OmegaConf.merge(cfg, layer)
            plain = OmegaConf.merge(plain, layer)
        if options:
            dotlist = parse_options(options)
            check_sections(shape, dotlist, "--options")
            cfg = OmegaConf.merge(cfg, dotlist)
            plain = OmegaConf.merge(plain, dotlist)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, cfg, where)) from None
    missing = sorted(OmegaConf.missing_keys(plain) | OmegaConf.missing_keys(cfg))
    if missing and not allow_missing:
        raise ConfigError(f"{where}: these keys must be set (e.g. --options {missing[0]}=...): {', '.join(missing)}")
    for key in missing:  # allow_missing: shape-only use, the value does not matter
        OmegaConf.update(cfg, key, None, force_add=True)
    _refuse_non_finite_settings(cfg, plain, where)
    return cfg


def describe_value(value: Any) -> str:
    """A config value as an error message shows it: null, a list, or the value itself."""
    if value is None:
        return "null (nothing after the colon)"
    if isinstance(value, (list, tuple)):
        return f"a list ({len(value)} items)"
    return f"the value {value!r}"


def check_sections(shape: dict, layer: Any, where: str, prefix: str = "") -> None:
    """A key that the schema holds as a mapping (model:, run:, eval.pope:, model.vib:, ...) must be a mapping in
    `layer` too: `model: 3`, `eval: [..]` or an empty `run:` is a ConfigError naming the key, where OmegaConf would
    say 'Merge error: int is not a subclass of ModelConfig' (or the demo fail with an AttributeError)."""
    values = OmegaConf.to_container(layer, resolve=False) if OmegaConf.is_config(layer) else layer
    if not isinstance(values, dict):
        return
    for key, value in values.items():
        if key not in shape or not isinstance(shape[key], dict):
            continue  # unknown keys and plain values: merge names them
        if OmegaConf.is_config(value):  # a DictConfig inside a plain dict layer
            value = OmegaConf.to_container(value, resolve=False)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {prefix}{key}: expected a mapping of its settings (indented `key: value` "
                              f"lines), got {describe_value(value)}")
        check_sections(shape[key], value, where, f"{prefix}{key}.")


def _refuse_non_finite_settings(cfg: DictConfig, plain: DictConfig, where: str) -> None:
    """First as written (YAML .nan / .inf), then as typed: a string such as 'nan' that a float field converted,
    reported with the schema's own wording for that key (`bad_value`) and the value as the user wrote it."""
    refuse_non_finite(OmegaConf.to_container(plain, resolve=False), where)
    found = first_non_finite(OmegaConf.to_container(cfg, resolve=False))
    if found is not None:
        key, value = found
        written = OmegaConf.select(plain, key, default=value) if "[" not in key else value
        explained = schema_bad_value(cfg, key, written)
        raise ConfigError(f"{where}: {explained or f'{key} = {value}; expected a finite number'}")


def load_yaml(path: str | os.PathLike) -> DictConfig:
    """A YAML config file through omegaconf's loader (which refuses duplicate keys), as a DictConfig.

    ConfigError naming `file:line:column` for a syntax error (a tab included: YAML indents with spaces), a
    duplicate key, a second document, or a top level that is not a mapping, of any YAML type: an empty file, a
    list, a set, a number, a string, null, a date, binary data (OmegaConf would load a list as a ListConfig, a
    word as `{word: null}`, and fail on a number with an OSError); a null key or a !!set value names the file.
    """
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        text = read_text(path)  # UTF-8 (a byte-order mark is fine); a FIFO or a device is refused
    except DataFileError as err:
        raise ConfigError(str(err)) from None
    try:
        top = yaml.compose(text, Loader=yaml.SafeLoader)  # the node tree: what the top level is, and where
        _require_mapping(path, top)  # before OmegaConf, which fails on a number or a set with an OSError
        loaded = OmegaConf.load(io.StringIO(text))
    except yaml.MarkedYAMLError as err:
        raise ConfigError(_explain_yaml(path, text, err)) from None
    except yaml.reader.ReaderError as err:  # a control character: a position, no line mark
        line = text.count("\n", 0, err.position) + 1
        code = err.character if isinstance(err.character, int) else ord(err.character)
        raise ConfigError(f"{path}:{line}: not valid YAML: character U+{code:04X} is not allowed "
                          f"({err.reason})") from None
    except OmegaConfBaseException as err:  # a null key (~: 1), a !!set value: YAML that is no config
        where = f"under {err.full_key!r}" if getattr(err, "full_key", None) else "at the top level"
        reason = str(err).split("\n", 1)[0]
        raise ConfigError(f"{path}: {where}: {reason}; config keys are names and values are numbers, strings, "
                          "booleans, lists or mappings") from None
    return loaded


_YAML_TAG = "tag:yaml.org,2002:"
SCALAR_KINDS = {"null": "null (an empty document)", "bool": "a boolean", "int": "a number", "float": "a number",
                "binary": "binary data (!!binary)", "timestamp": "a date"}


def _require_mapping(path: str | os.PathLike, top: yaml.Node | None) -> None:
    """ConfigError unless the document's top level is a plain mapping: an empty file, a list, a set, a number, a
    string, null, a date or binary data all name what they are and the line they start on."""
    expected = "expected a mapping of sections (model:, run:, datasets:, eval:)"
    if top is None:
        raise ConfigError(f"{path}: the file holds no YAML document (empty, or comments only); {expected}")
    if isinstance(top, yaml.MappingNode) and top.tag == _YAML_TAG + "map":
        return
    tag = top.tag[len(_YAML_TAG):] if top.tag.startswith(_YAML_TAG) else top.tag
    if isinstance(top, yaml.SequenceNode):
        kind = "a list"
    elif isinstance(top, yaml.MappingNode):  # !!set, !!python/object:..., !custom
        kind = f"a mapping tagged {'!!' + tag if top.tag.startswith(_YAML_TAG) else tag}, not a plain mapping"
    elif tag in SCALAR_KINDS:
        kind = SCALAR_KINDS[tag] + ("" if tag in ("null", "binary") else f" ({top.value})")
    else:
        kind = f"a single value ({top.value!r})"
    raise ConfigError(f"{path}:{top.start_mark.line + 1}: the top level is {kind}; {expected}")


def _explain_yaml(path: str | os.PathLike, text: str, err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark or err.context_mark
    if mark is None:
        return f"{path}: not valid YAML: {err.problem or err.context}"
    where = f"{path}:{mark.line + 1}:{mark.column + 1}"
    lines = text.split("\n")
    line = lines[mark.line] if mark.line < len(lines) else ""
    if line[mark.column:mark.column + 1] == "\t":
        return f"{where}: a tab character; YAML indents and separates with spaces only"
    problem = err.problem or "not valid YAML"
    if problem.startswith("found duplicate key") and err.context_mark is not None:
        key = problem[len("found duplicate key"):].strip()
        return (f"{where}: duplicate key '{key}' (in the mapping that starts on line {err.context_mark.line + 1}); "
                "each key may appear once")
    context = f" ({err.context} on line {err.context_mark.line + 1})" if err.context and err.context_mark else ""
    return f"{where}: YAML syntax error: {problem}{context}"


def parse_options(options: list[str]) -> DictConfig:
    """`--options key=value ...` as a DictConfig. An item without `=` (omegaconf reads `run.init_lr` as
    `run.init_lr=null`) or with an empty key part is an error, as is a value that is not valid YAML."""
    for item in options:
        key, sep, _ = item.partition("=")
        if not sep or "" in key.strip().split("."):
            raise ConfigError(f"--options {item!r}: expected key=value, e.g. run.init_lr=1e-5 (no spaces around =)")
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as err:
            raise ConfigError(f"--options {item!r}: the value is not valid YAML "
                              f"({getattr(err, 'problem', None) or err})") from None
    return OmegaConf.from_dotlist(list(options))


def refuse_non_finite(values: Any, where: str, prefix: str = "") -> None:
    """No setting means NaN or inf, and NaN passes every `x < 0` / `x <= 0` check (all comparisons with it are
    false) to surface later as a NaN loss or score: refuse it here, naming the key."""
    found = first_non_finite(values, prefix)
    if found is not None:
        raise ConfigError(f"{where}: {found[0]} = {found[1]}; expected a finite number")


def first_non_finite(values: Any, prefix: str = "") -> tuple[str, float] | None:
    """(dotted key, value) of the first NaN or inf float in nested dicts/lists, or None."""
    if isinstance(values, dict):
        items = ((f"{prefix}.{key}" if prefix else str(key), value) for key, value in values.items())
    elif isinstance(values, (list, tuple)):
        items = ((f"{prefix}[{index}]", value) for index, value in enumerate(values))
    else:
        return (prefix, values) if isinstance(values, float) and not math.isfinite(values) else None
    for key, value in items:
        if (found := first_non_finite(value, key)) is not None:
            return found
    return None


def _explain(err: OmegaConfBaseException, cfg: DictConfig, where: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(cfg, parent) if parent else cfg
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        return f"{where}: unknown key '{key}'" + (f"; valid keys here: {', '.join(map(str, valid))}" if valid else "")
    explained = schema_bad_value(cfg, key, getattr(err, "value", None)) if key != "?" else None
    return f"{where}: {explained}" if explained else f"{where}: bad value for '{key}': {msg}"


def schema_bad_value(cfg: DictConfig, key: str, value: Any) -> str | None:
    """The message a section's schema gives for a bad `value` at dotted `key` (its classmethod
    `bad_value(key, value)`, e.g. RunConfig's ranges), or None where the schema has no wording for it."""
    parent = key.rpartition(".")[0]
    try:
        node = OmegaConf.select(cfg, parent) if parent else cfg
    except OmegaConfBaseException:
        return None
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    bad_value = getattr(schema, "bad_value", None)
    return bad_value(key, value) if callable(bad_value) else None


def typed_section(schema: Any, values: Any, *, prefix: str) -> Any:
    """`values` (a mapping) merged into the dataclass `schema` and returned as an instance of it: the typed form
    of a section whose schema is chosen at run time (each `datasets.<builder>` entry). An unknown key or a value
    of the wrong type raises ConfigError naming `prefix.key` (wording from the schema's `bad_value` if it has it)."""
    valid = sorted(f.name for f in dataclasses.fields(schema))
    for key in values:
        if key not in valid:
            raise ConfigError(f"{prefix}.{key}: unknown option; valid: {', '.join(valid)}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as err:
        key = f"{prefix}.{getattr(err, 'full_key', None) or '?'}"
        explained = schema.bad_value(key, err.value) if hasattr(schema, "bad_value") else None
        raise ConfigError(explained or f"{key}: {str(err).splitlines()[0]}") from None
    return OmegaConf.to_object(node)


def validate_model_config(model: DictConfig, *, check_files: bool = True) -> None:
    """Semantic checks that types alone cannot express; raises ConfigError naming the key."""
    choices = {
        "mm_projector_type": ("linear", "vib"),
        "precision": PRECISION_CHOICES,
        "llm_dtype": DTYPE_CHOICES,
        "encoder_dtype": DTYPE_CHOICES,
        "visual_tokens": ("qformer", "vit_patch4", "cnn_grid"),
        "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
        "prompt_template": ("vicuna_v0", "llama2", "plain", "llava15", "smollm2"),
        "arch": ("minigpt4", "llava15"),
    }
    for key, valid in choices.items():
        value = OmegaConf.select(model, key)
        if value not in valid:
            raise ConfigError(f"model.{key} = {value!r}; expected one of {', '.join(valid)}")
    for key in ("max_txt_len", "num_query_tokens"):  # 0 would leave no answer token / no visual token
        if model[key] < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {model[key]}")
    if model.encoder_device not in (None, "cpu"):
        raise ConfigError(f"model.encoder_device = {model.encoder_device!r}; expected null (with the LLM) or cpu")
    OmegaConf.to_object(model.vib).validate()
    if model.visual_tokens == "qformer" and (model.vit_path is None) != (model.qformer_path is None):
        raise ConfigError("model.vit_path and model.qformer_path come together (LAVIS ViT + BLIP-2 Q-Former); "
                          "set both, or use model.encoder_path / model.blip2_hf_path")
    check_arch_keys(model)
    check_precision(model)
    check_visual_tokens(model)
    if check_files:
        check_paths(model, PATH_KEYS, prefix="model")


def check_arch_keys(model: DictConfig) -> None:
    """A weight path the chosen architecture never reads is a mistake (a wrong recipe), not a no-op."""
    unused = MINIGPT4_ONLY_KEYS if model.arch == "llava15" else LLAVA_ONLY_KEYS
    for key in unused:
        if model.get(key) is not None:
            hint = ("LLaVA-1.5 takes its CLIP tower, projector, LLM and tokenizer from model.llava_path"
                    if model.arch == "llava15" else "model.llava_path is for model.arch: llava15")
            raise ConfigError(f"model.{key} is not used by model.arch = {model.arch!r}; {hint}")
    if model.arch == "llava15" and model.low_resource:
        raise ConfigError("model.low_resource (8-bit LLM) is not supported for model.arch = 'llava15'")
    if model.arch == "llava15" and model.encoder_device is not None:
        raise ConfigError("model.encoder_device is not supported for model.arch = 'llava15'")


# The llm_dtype / encoder_dtype each precision implies (reference's encoder is mixed: no single dtype).
PRECISION_DTYPES = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "reference": ("fp16", None)}


def check_precision(model: DictConfig) -> None:
    """model.precision sets every part's dtype; a per-part dtype key that says otherwise is an error."""
    for key, implied in zip(("llm_dtype", "encoder_dtype"), PRECISION_DTYPES.get(model.precision, ())):
        if model[key] not in ("auto", implied):
            raise ConfigError(f"model.{key} = {model[key]!r} contradicts model.precision = {model.precision!r}, "
                              f"which sets every part's dtype; drop model.{key}, or use model.precision: auto")
    if model.precision == "reference" and model.arch != "minigpt4":
        raise ConfigError(f"model.precision: reference reproduces MiniGPT-4/AdaVIB; for model.arch = {model.arch!r} "
                          "use auto, bf16 or fp32")


def check_visual_tokens(model: DictConfig) -> None:
    """MiniGPT-4's Llama-2 variant (vit_patch4) has no Q-Former: every Q-Former source would be unused, and the
    converted/BLIP-2 files would bring BLIP-2's ln_vision, which that variant never loads. The CNN encoder
    (cnn_grid) reads model.cnn_path alone, and only it does."""
    if model.cnn_path is not None and model.visual_tokens != "cnn_grid":
        raise ConfigError(f"model.cnn_path is read only by model.visual_tokens = 'cnn_grid' (this model's is "
                          f"{model.visual_tokens!r}); remove it or set model.visual_tokens: cnn_grid")
    if model.grid_group != 1 and model.visual_tokens != "cnn_grid":
        raise ConfigError("model.grid_group is for model.visual_tokens = 'cnn_grid'; remove it")
    if model.visual_tokens == "qformer":
        return
    if model.arch != "minigpt4":
        raise ConfigError(f"model.visual_tokens = {model.visual_tokens!r} is for model.arch: minigpt4")
    if model.visual_tokens == "cnn_grid":
        for key in ("encoder_path", "vit_path", "qformer_path", "blip2_hf_path"):
            if model.get(key) is not None:
                raise ConfigError(f"model.{key} is not used by model.visual_tokens = 'cnn_grid' (a pretrained CNN, "
                                  "no ViT or Q-Former); give the converted CNN folder as model.cnn_path")
        if model.qformer:
            raise ConfigError("model.qformer is not used by model.visual_tokens = 'cnn_grid' (no Q-Former); remove it")
        side = math.ceil(int(model.vision.get("image_size", 224)) / 32)  # EfficientNet's stride: 224 px -> 7 × 7
        if model.grid_group < 1 or (side * side) % model.grid_group:
            raise ConfigError(f"model.grid_group = {model.grid_group}: the {side} × {side} feature map has "
                              f"{side * side} positions, which cannot be grouped by {model.grid_group}; use a divisor "
                              f"of {side * side} (1: a token per position, {side}: a token per row)")
        return
    for key in ("encoder_path", "qformer_path", "blip2_hf_path"):
        if model.get(key) is not None:
            raise ConfigError(f"model.{key} is not used by model.visual_tokens = 'vit_patch4' (MiniGPT-4's Llama-2 "
                              "variant, no Q-Former); give the EVA ViT alone as model.vit_path (eva_vit_g.pth)")
    if model.qformer:
        raise ConfigError("model.qformer is not used by model.visual_tokens = 'vit_patch4' (no Q-Former); remove it")


def resolve_training_amp(precision: str, amp: str | None) -> str | None:
    """run.amp for `model.precision`: it follows the precision (TRAINING_AMP) when the recipe leaves it out, and
    one that contradicts the precision is an error. With precision auto, run.amp is what the recipe says."""
    wanted = TRAINING_AMP.get(precision)
    if wanted is None:
        return amp
    if amp is None:
        return wanted
    if amp != wanted:
        raise ConfigError(f"run.amp = {amp!r} contradicts model.precision = {precision!r}, which trains under "
                          f"run.amp: {wanted}; drop run.amp (it follows model.precision) or use model.precision: auto")
    return amp


def training_run_settings(precision: str, run: dict[str, Any]) -> dict[str, Any]:
    """The `run:` section with what `model.precision` implies: run.amp (`resolve_training_amp`), and no FSDP for
    reference, whose ViT blocks mix fp16 Linear and fp32 LayerNorm weights (FSDP flattens a unit into one dtype)."""
    run = dict(run)
    amp = resolve_training_amp(precision, run.get("amp"))
    if amp is not None:
        run["amp"] = amp
    if precision == "reference" and run.get("distributed") == "fsdp":
        raise ConfigError("run.distributed: fsdp cannot shard model.precision: reference (its ViT blocks mix fp16 "
                          "and fp32 weights, FSDP needs one dtype per unit); use run.distributed: ddp")
    return run


def check_paths(node: DictConfig, keys: tuple[str, ...], *, prefix: str) -> None:
    for key in keys:
        path = node.get(key)
        if path is not None and not os.path.exists(path):
            raise ConfigError(f"{prefix}.{key}: path not found: {path}")
