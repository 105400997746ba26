"""Pieces both Hugging Face exports share: the tokenizer with an image token, the image processor's checked
settings, the chat template written from this project's prompt template, the grown vocabulary rows, the VIB side
file, and writing a transformers model whose tensors are this model's own (assigned on the meta device, so a 7B
export holds one copy in memory)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from minigpt4.conversation.templates import IMAGE_PLACEHOLDER, Template
from minigpt4.export.source import ExportError
from minigpt4.models.checkpoints import load_state_file, save_state_file
from minigpt4.models.vib import VIBProjector

IMAGE_TOKEN = "<image>"
VIB_HEAD_FILE = "adavib_vib_head.safetensors"
MANIFEST_FILE = "adavib_export.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ tokenizer


def tokenizer_path(cfg) -> str:
    return cfg.tokenizer_path or cfg.llm_path or cfg.llava_path


def export_tokenizer(cfg, model, notes: list[str]):
    """A fresh copy of the model's tokenizer that (1) adds BOS itself, as the model's prompts start with BOS (this
    project adds it in code); (2) pads with the token the model pads with; (3) has the `<image>` token."""
    from transformers import AddedToken, AutoTokenizer

    path = tokenizer_path(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bos = tokenizer.bos_token_id
    if tokenizer("a").input_ids[:1] != [bos]:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, add_bos_token=True)
        if tokenizer("a").input_ids[:1] != [bos]:
            raise ExportError(f"{path}: cannot make this tokenizer add its BOS token {tokenizer.bos_token!r}; "
                              "transformers' processors would then build prompts without BOS")
        notes.append("The exported tokenizer adds BOS itself (its tokenizer.json post-processor); this project adds "
                     "it in code.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = model.tokenizer.pad_token
        notes.append(f"The tokenizer had no pad token; it pads with {tokenizer.pad_token!r} as this project does "
                     "(pads are masked out).")
    for loading_only in ("local_files_only", "is_local"):  # how we read it, not part of the tokenizer
        tokenizer.init_kwargs.pop(loading_only, None)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        notes.append(f"`{IMAGE_TOKEN}` was added to the tokenizer as id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}"
                     "; its prompt positions receive the visual tokens.")
    return tokenizer


def export_vocabulary(cfg, model, notes: list[str]) -> tuple[object, int, int]:
    """(`export_tokenizer`'s tokenizer, the id of its `<image>` token, the rows the exported embed_tokens and
    lm_head need: one per token, or the model's own count where it already has more)."""
    tokenizer = export_tokenizer(cfg, model, notes)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return tokenizer, image_id, max(len(tokenizer), model.llm.get_input_embeddings().weight.shape[0])


def grown_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` with rows appended up to `rows`, each the mean of the existing rows (a neutral choice: the image
    token's input embedding is always replaced, and generation_config suppresses it as an output)."""
    if rows < weight.shape[0]:
        raise ExportError(f"the tokenizer has {rows} tokens but the LLM's embedding has {weight.shape[0]} rows")
    extra = weight.float().mean(dim=0, keepdim=True).to(weight.dtype).expand(rows - weight.shape[0], -1)
    return torch.cat([weight.detach(), extra]) if rows > weight.shape[0] else weight.detach()


def llm_tensors(llm: nn.Module, vocab_rows: int) -> tuple[dict[str, torch.Tensor], bool]:
    """The causal LM's state dict with embed_tokens and lm_head grown to `vocab_rows`; (tensors, grown?)."""
    state = dict(llm.state_dict())
    grown = False
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state and state[key].shape[0] != vocab_rows:
            state[key] = grown_rows(state[key], vocab_rows)
            grown = True
    return state, grown


def single_token_id(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


# ------------------------------------------------------------------------------------------ image processor


def image_processor_settings(vis_processor: dict | None, name: str, size: int, processor: str,
                             tower: str) -> tuple[dict, dict]:
    """The evaluation transform an exported image processor reproduces, checked, and its normalisation.

    `vis_processor` (eval.vis_processor; None: `name` at `size` px) must be the transform `name` at the vision
    tower's `size` px, the one transform the HF `processor` holds. Returns (the transform's settings,
    {"image_mean", "image_std"}: its mean and std, CLIP's unless it sets them)."""
    from minigpt4.processors.image import CLIP_MEAN, CLIP_STD

    vis = dict(vis_processor or {"name": name, "image_size": size})
    if vis.get("name") != name or int(vis.get("image_size", size)) != size:
        raise ExportError(f"eval.vis_processor = {vis}: the {processor} holds {name} at the {tower}'s {size} px; "
                          "export with that transform")
    return vis, {"image_mean": list(vis.get("mean", CLIP_MEAN)), "image_std": list(vis.get("std", CLIP_STD))}


def preprocessing_difference(hf_processor: str, steps: str, ours: str, torchvision_note: str) -> dict:
    """The model card's "image preprocessing" row (DIFFERENCES of blip2_hf.py and llava_hf.py): the HF image
    processor's `steps` are pixel-identical to this project's transform `ours` with PIL; torchvision's backend,
    which AutoProcessor prefers when it is installed, is not."""
    return {"what": "image preprocessing", "exact": True,
            "detail": f"{hf_processor}: {steps}, CLIP mean/std: pixel-identical to this project's {ours} with the PIL "
                      "backend. With torchvision installed AutoProcessor picks the torchvision backend "
                      f"({torchvision_note}) unless given backend=\"pil\"."}


# -------------------------------------------------------------------------------------------- chat template


def chat_template(template: Template, image_text: str) -> str:
    """A Jinja chat template that renders messages exactly as `Conversation.prompt` does for `template`: system
    text, then per user turn `human + (image + image_sep) per image + text`, the assistant prefix before every
    answer and `answer + end + turn_sep` after it (Vicuna v0's "###" is written once). `image_text` is what one
    image becomes (MiniGPT-4: `<Img>` + N `<image>` + `</Img>`; LLaVA: one `<image>`, expanded by the processor)."""
    closing = "" if template.human.startswith(template.end_sym) else template.end_sym
    values = {"human": template.human, "assistant": template.assistant, "closing": closing,
              "turn_sep": template.turn_sep, "image": template.image.replace(IMAGE_PLACEHOLDER, image_text) +
              template.image_sep if template.image else ""}
    sets = "".join(f"{{%- set {k} = {json.dumps(v, ensure_ascii=False)} -%}}\n" for k, v in values.items())
    return sets + (
        "{%- for message in messages -%}\n"
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = 0 -%}\n"
        "{%- else -%}\n"
        "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
        " | join(' ') -%}\n"
        "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}\n"
        "{%- endif -%}\n"
        "{%- if message['role'] == 'system' -%}{{ text }}\n"
        "{%- elif message['role'] == 'user' -%}{{ human }}{{ image * images }}{{ text }}\n"
        "{%- elif message['role'] == 'assistant' -%}{{ assistant }}{{ text }}{{ closing }}{{ turn_sep }}\n"
        "{%- else -%}{{ raise_exception('unknown role: ' ~ message['role']) }}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{ assistant }}{%- endif -%}\n"
    )


# ------------------------------------------------------------------------------------------ the VIB side file


def write_vib_head(out: Path, projector: nn.Module, vib: dict, mean_head: str) -> str | None:
    """σ head + prior of a VIB projector, keyed as in this project's trainable.safetensors, fp32; None if linear."""
    if not isinstance(projector, VIBProjector):
        return None
    tensors = {f"projector.llama_proj_std.{k}": v.float() for k, v in projector.llama_proj_std.state_dict().items()}
    tensors["projector.mu_p"] = projector.mu_p.float()
    tensors["projector.std_p"] = projector.std_p.float()
    metadata = {"adavib_vib": json.dumps(vib), "mean_head": mean_head,
                "note": "the mean head μ is the exported model's " + mean_head}
    save_state_file(out / VIB_HEAD_FILE, tensors, metadata)
    return VIB_HEAD_FILE


def read_vib_head(folder: Path) -> dict[str, torch.Tensor]:
    return load_state_file(folder / VIB_HEAD_FILE)


# -------------------------------------------------------------------------------------- writing the HF model


def save_with_tensors(model_cls, config, tensors: dict[str, torch.Tensor], out: Path, dtype: torch.dtype,
                      generation: dict, keep_fp32: tuple[str, ...] = ()) -> None:
    """Build `model_cls(config)` on the meta device, assign `tensors` (cast to `dtype`, names starting with
    `keep_fp32` stay fp32) strictly, and save_pretrained it as safetensors."""
    from transformers import GenerationConfig

    with torch.device("meta"):
        hf = model_cls(config)
    cast = {k: (v if k.startswith(keep_fp32) and keep_fp32 else v.to(dtype)).detach() for k, v in tensors.items()}
    missing, unexpected = sorted(set(hf.state_dict()) - set(cast)), sorted(set(cast) - set(hf.state_dict()))
    if missing or unexpected:  # an internal mapping bug, not a user error: show it all
        raise RuntimeError(f"{model_cls.__name__}: missing {missing[:8]}, unexpected {unexpected[:8]}")
    hf.load_state_dict(cast, strict=True, assign=True)
    hf.generation_config = GenerationConfig(**generation)
    hf.save_pretrained(out, safe_serialization=True)
    # save_pretrained records the first parameter's dtype (BLIP-2: the fp32 query tokens); say what was written.
    hf.config.dtype = dtype
    hf.config.save_pretrained(out)


def export_dtype(name: str, model) -> torch.dtype:
    """--dtype: auto = the dtype the LLM was loaded in (model.llm_dtype); else fp32 / fp16 / bf16."""
    if name == "auto":
        return model.llm.get_input_embeddings().weight.dtype
    return DTYPES[name]


# ---------------------------------------------------------------------------------------- prompt token check


def render_prompt(processor, question: str) -> str:
    """One user turn (an image, then `question`) through the export's chat template, ready for generation. The
    tokenizer holds the template for both formats (a reloaded Blip2Processor keeps none of its own)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_token_check(model, processor, image, question: str = "Describe this image.") -> dict:
    """Tokenize one prompt both ways: this project's model (text around the image, image slots) and the exported
    processor (chat template + tokenizer); report whether ids and image positions agree exactly."""
    ours = model.build_generation_text([model.template.prompt(question)])
    ours_ids = ours.input_ids[0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ours_ids = [image_id if slot else t for t, slot in zip(ours_ids, ours.image_mask[0].tolist())]
    text = render_prompt(processor, question)
    theirs = processor(images=image, text=text, return_tensors="pt").input_ids[0].tolist()
    first = next((i for i, (a, b) in enumerate(zip(ours_ids, theirs)) if a != b), None)
    if first is None and len(ours_ids) != len(theirs):
        first = min(len(ours_ids), len(theirs))
    record = {"question": question, "prompt": text, "equal": first is None, "first_difference": first,
              "num_tokens": {"this_project": len(ours_ids), "export": len(theirs)},
              "image_tokens": theirs.count(image_id)}
    if first is not None:  # the ids around the difference, both ways, decoded too: what exactly differs
        window = slice(max(first - 3, 0), first + 5)
        for name, ids in (("this_project", ours_ids), ("export", theirs)):
            record[f"{name}_ids_near"] = ids[window]
            record[f"{name}_tokens_near"] = processor.tokenizer.convert_ids_to_tokens(ids[window])
    return record
