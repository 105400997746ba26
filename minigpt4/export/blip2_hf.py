"""MiniGPT-4 -> (a) the original projector file and (b) a `Blip2ForConditionalGeneration` folder.

(a) `minigpt4_projector.pth`: `{"model": {"llama_proj.weight", "llama_proj.bias"}}`, tensors only (fp32, as trained),
    the layout Vision-CAIR/MiniGPT-4 minigpt4/models/mini_gpt4.py loads with `load_state_dict(ckpt["model"],
    strict=False)` (its `llama_proj` is `nn.Linear(Qformer hidden, LLaMA hidden)`).
(b) transformers' BLIP-2 holds every part of MiniGPT-4 under the same classes this project builds on
    (`Blip2VisionModel`, `Blip2QFormerModel`, a Llama causal LM): ViT -> `vision_model`, ln_vision ->
    `vision_model.post_layernorm`, Q-Former -> `qformer`, queries -> `query_tokens`, μ head ->
    `language_projection`, Vicuna -> `language_model`. What transformers computes differently, and what this
    export does about each, is `DIFFERENCES` below (also written into the model card and adavib_export.json).
"""
from __future__ import annotations

from pathlib import Path

import torch

from minigpt4.export import hf_parts
from minigpt4.export.source import ExportSource
from minigpt4.models.encoders import LN_VISION_EPS

PROJECTOR_FILE = "minigpt4_projector.pth"

# Measured on the committed shapes-world model by tests/test_export_hf.py (greedy tokens, this model vs the
# reloaded export); the numbers there are the reference for the wording here.
DIFFERENCES = [
    {"what": "ln_vision eps", "exact": False,
     "detail": "transformers builds vision_model.post_layernorm with vision_config.layer_norm_eps, the one eps of "
               "the ViT blocks ({block_eps:g}); this project's ln_vision (LAVIS) uses {ln_eps:g}. The blocks are kept "
               "exact, so the final norm divides by sqrt(var + {block_eps:g}) instead of sqrt(var + {ln_eps:g}): a "
               "relative change of about {gap:.1e}/var per feature. Exact after loading with "
               "`model.vision_model.post_layernorm.eps = {ln_eps:g}`."},
    {"what": "ln_vision precision", "exact": None,
     "detail": "this project computes ln_vision in fp32 whatever the ViT dtype; transformers computes "
               "post_layernorm in the vision model's dtype. Identical in fp32; loaded in fp16/bf16 the norm runs "
               "in half precision. This export's dtype: {dtype}."},
    {"what": "image tokens inside the prompt", "exact": True,
     "detail": "MiniGPT-4 puts the {n} visual tokens inside `###Human: <Img>…</Img> …`; Blip2Processor prepends "
               "them before BOS when its num_query_tokens is set. The processor is saved with num_query_tokens = "
               "null and a chat template that writes `<Img>` + {n} × `<image>` + `</Img>` where MiniGPT-4 puts "
               "the image, and Blip2ForConditionalGeneration scatters the visual tokens into exactly those "
               "positions (checked: prompt_check). Build prompts with the chat template."},
    {"what": "vocabulary", "exact": True,
     "detail": "`<image>` (id {image_id}) is an extra row of embed_tokens and lm_head (the mean of the others); "
               "generation_config.suppress_tokens keeps generation from ever choosing it."},
    {"what": "stopping", "exact": True,
     "detail": "MiniGPT-4 stops when the text ends with {end!r}: call generate(..., stop_strings=[{end!r}], "
               "tokenizer=processor.tokenizer) for the same. generation_config also stops at EOS{single}."},
    {"what": "Q-Former", "exact": True,
     "detail": "the same Blip2QFormerModel (query branch only; LAVIS's embeddings LayerNorm is qformer.layernorm, "
               "eps {q_eps:g}); transformers passes an all-ones image attention mask, this project none: the same "
               "computation. Blip2ForConditionalGeneration keeps qformer and query_tokens in fp32 when loaded in "
               "half precision (_keep_in_fp32_modules), as MiniGPT-4 ran them; this export stores them in fp32."},
    hf_parts.preprocessing_difference("BlipImageProcessor", "bicubic resize to {size}×{size} (aspect ratio not kept)",
                                      "blip2_image_eval", "torch's bicubic: small pixel differences"),
]


def write_projector_pth(source: ExportSource, out: Path) -> str:
    """The μ head as the original MiniGPT-4 projector checkpoint (fp32 tensors, weights_only-loadable)."""
    head = source.model.projector.llama_proj
    state = {"llama_proj.weight": head.weight.detach().float().cpu().clone(),
             "llama_proj.bias": head.bias.detach().float().cpu().clone()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, out / PROJECTOR_FILE)
    return PROJECTOR_FILE


def blip2_config(model, image_id: int, vocab_rows: int, dtype: torch.dtype):
    from transformers import Blip2Config

    text = model.llm.config.to_dict()
    text["vocab_size"] = vocab_rows
    config = Blip2Config(vision_config=model.encoder.vision_config.to_dict(),
                         qformer_config=model.encoder.qformer_config.to_dict(), text_config=text,
                         num_query_tokens=model.encoder.num_query_tokens, image_token_index=image_id)
    config.dtype = dtype
    return config


def blip2_tensors(model, vocab_rows: int) -> tuple[dict[str, torch.Tensor], bool]:
    """This model's tensors under Blip2ForConditionalGeneration's names; (tensors, vocabulary grown?)."""
    enc = model.encoder
    tensors = {f"vision_model.{k}": v for k, v in enc.vision_model.state_dict().items()}
    tensors.update({f"vision_model.post_layernorm.{k}": v for k, v in enc.ln_vision.state_dict().items()})
    tensors.update({f"qformer.{k}": v for k, v in enc.qformer.state_dict().items()})
    tensors["query_tokens"] = enc.query_tokens
    tensors.update({f"language_projection.{k}": v for k, v in model.projector.llama_proj.state_dict().items()})
    llm, grown = hf_parts.llm_tensors(model.llm, vocab_rows)
    tensors.update({f"language_model.{k}": v for k, v in llm.items()})
    return tensors, grown


def blip2_processor(model, tokenizer, vis_processor: dict | None, template_text: str):
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    size = int(model.encoder.vision_config.image_size)
    _, normalisation = hf_parts.image_processor_settings(vis_processor, "blip2_image_eval", size,
                                                         "BLIP-2 processor", "ViT")
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size}, resample=3, do_convert_rgb=True,
                                            **normalisation)
    # Blip2Processor.__init__ drops a chat_template argument and a reloaded one has none: the tokenizer carries it
    # (chat_template.jinja), so `processor.tokenizer.apply_chat_template` renders prompts.
    tokenizer.chat_template = template_text
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=None)
    processor.chat_template = template_text
    return processor


def write_blip2_folder(source: ExportSource, out: Path, dtype: torch.dtype, notes: list[str]) -> dict:
    """The Blip2ForConditionalGeneration folder; returns what the manifest and the model card say about it."""
    from transformers import Blip2ForConditionalGeneration

    model = source.model
    tokenizer, image_id, rows = hf_parts.export_vocabulary(source.cfg, model, notes)
    tensors, grown = blip2_tensors(model, rows)
    n = model.encoder.num_query_tokens
    template_text = hf_parts.chat_template(model.template, hf_parts.IMAGE_TOKEN * n)
    end = model.end_sym
    stop_id = hf_parts.single_token_id(tokenizer, end) if end else None
    eos = [tokenizer.eos_token_id] + ([stop_id] if stop_id is not None and stop_id != tokenizer.eos_token_id else [])
    generation = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                      do_sample=False, suppress_tokens=[image_id])
    hf_parts.save_with_tensors(Blip2ForConditionalGeneration, blip2_config(model, image_id, rows, dtype), tensors,
                               out, dtype, generation, keep_fp32=("qformer.", "query_tokens"))
    processor = blip2_processor(model, tokenizer, source.vis_processor, template_text)
    processor.save_pretrained(out)
    block_eps = model.encoder.vision_config.layer_norm_eps
    values = dict(block_eps=block_eps, ln_eps=LN_VISION_EPS, gap=abs(LN_VISION_EPS - block_eps) / 2,
                  dtype=str(dtype).replace("torch.", ""), n=n, image_id=image_id, end=end,
                  single=f" and at the single token {end!r} (id {stop_id})" if stop_id is not None else "",
                  q_eps=model.encoder.qformer_config.layer_norm_eps, size=model.encoder.vision_config.image_size)
    differences = [{**d, "detail": d["detail"].format(**values)} for d in DIFFERENCES]
    differences[0]["exact"] = block_eps == LN_VISION_EPS
    differences[1]["exact"] = dtype == torch.float32
    if source.cfg.get("precision") == "reference":  # models/precision.py: LAVIS's fp16 mix, fp16 autocast
        differences[1]["exact"] = False
        differences[1]["detail"] += (" The model was configured with model.precision: reference (fp16 Linear/Conv "
                                     "weights, fp32 norms, embeddings and Q-Former, fp16 autocast): no single "
                                     "transformers dtype computes that mix.")
    if not grown:
        differences[3]["detail"] += " (the embedding already had a row for it: nothing was added)"
    return {"format": "blip2-hf", "class": "Blip2ForConditionalGeneration", "image_token_id": image_id,
            "num_image_tokens": n, "differences": differences, "stop": end}
