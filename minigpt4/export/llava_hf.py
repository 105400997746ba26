"""LLaVA-1.5 -> a llava-hf folder: `LlavaForConditionalGeneration` with the trained μ head as
`multi_modal_projector`, the processor (image settings of this project's clip_image_eval, the chat template).

This project's `Llava15` is built from the parts of a `LlavaForConditionalGeneration` (models/llava.py
`split_llava`): the CLIP tower, the projector MLP (the VIB mean head), the language model and its head. The export
puts them back under the folder's own config (image token, projector activation, feature layer and selection),
so transformers computes what this project computes; `DIFFERENCES` lists what a user should still know.
"""
from __future__ import annotations

from pathlib import Path

import torch

from minigpt4.export import hf_parts
from minigpt4.export.source import ExportError, ExportSource

DIFFERENCES = [
    {"what": "computation", "exact": True,
     "detail": "the same modules and order: CLIP hidden states of layer {layer}, CLS {cls}, the 2-layer GELU MLP "
               "(μ head), the visual tokens scattered into the `<image>` positions, the same Llama."},
    hf_parts.preprocessing_difference("LlavaImageProcessor",
                                      "{pad}bicubic resize of the shortest edge to {size}, centre crop {size}",
                                      "clip_image_eval", "small pixel differences"),
    {"what": "vocabulary", "exact": True,
     "detail": "image token `<image>` = id {image_id}{grown}."},
]


def llava_config(source: ExportSource, image_id: int, rows: int, dtype: torch.dtype):
    """The llava_path folder's LlavaConfig with this model's sizes (vocabulary rows may have grown)."""
    from transformers import LlavaConfig

    config = LlavaConfig.from_pretrained(source.cfg.llava_path, local_files_only=True)
    encoder = source.model.encoder
    if config.vision_feature_layer != encoder.feature_layer:
        raise ExportError(f"{source.cfg.llava_path}/config.json: vision_feature_layer {config.vision_feature_layer} "
                          f"but the model uses {encoder.feature_layer}")
    config.vision_config = encoder.config
    config.text_config = type(source.model.llm.config).from_dict(source.model.llm.config.to_dict())
    config.text_config.vocab_size = rows
    config.image_token_index = image_id
    config.image_seq_length = encoder.num_query_tokens
    config.dtype = dtype
    return config


def llava_tensors(model, rows: int) -> tuple[dict[str, torch.Tensor], bool]:
    tensors = {f"model.vision_tower.{k}": v for k, v in model.encoder.vision_tower.state_dict().items()}
    tensors.update({f"model.multi_modal_projector.{k}": v
                    for k, v in model.projector.llama_proj.state_dict().items()})
    llm, grown = hf_parts.llm_tensors(model.llm, rows)
    tensors.update({("lm_head." + k[len("lm_head."):]) if k.startswith("lm_head.") else
                    "model.language_model." + k[len("model."):]: v for k, v in llm.items()})
    return tensors, grown


def llava_processor(model, tokenizer, vis_processor: dict | None, template_text: str):
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    size = int(model.encoder.config.image_size)
    vis, normalisation = hf_parts.image_processor_settings(vis_processor, "clip_image_eval", size,
                                                           "llava-hf processor", "CLIP tower")
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_pad=bool(vis.get("pad", True)),
        resample=3, **normalisation)
    strategy = "default" if model.encoder.drop_cls else "full"
    tokenizer.chat_template = template_text  # also usable as processor.tokenizer.apply_chat_template
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=model.encoder.config.patch_size, vision_feature_select_strategy=strategy,
                          chat_template=template_text, image_token=hf_parts.IMAGE_TOKEN,
                          num_additional_image_tokens=1)


def write_llava_folder(source: ExportSource, out: Path, dtype: torch.dtype, notes: list[str]) -> dict:
    from transformers import LlavaForConditionalGeneration

    model = source.model
    tokenizer, image_id, rows = hf_parts.export_vocabulary(source.cfg, model, notes)
    tensors, grown = llava_tensors(model, rows)
    generation = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, do_sample=False)
    if grown:
        generation["suppress_tokens"] = [image_id]
    hf_parts.save_with_tensors(LlavaForConditionalGeneration, llava_config(source, image_id, rows, dtype), tensors,
                               out, dtype, generation)
    template_text = hf_parts.chat_template(model.template, hf_parts.IMAGE_TOKEN)
    llava_processor(model, tokenizer, source.vis_processor, template_text).save_pretrained(out)
    vis = source.vis_processor or {}
    values = dict(layer=model.encoder.feature_layer, cls="dropped" if model.encoder.drop_cls else "kept",
                  pad="pad to square with the mean colour, " if vis.get("pad", True) else "",
                  size=model.encoder.config.image_size, image_id=image_id,
                  grown=" (added: one more row of embed_tokens and lm_head, the mean of the others, suppressed in "
                        "generation_config)" if grown else "")
    differences = [{**d, "detail": d["detail"].format(**values)} for d in DIFFERENCES]
    return {"format": "llava-hf", "class": "LlavaForConditionalGeneration", "image_token_id": image_id,
            "num_image_tokens": model.encoder.num_query_tokens, "differences": differences, "stop": model.end_sym}
