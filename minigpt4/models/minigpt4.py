"""MiniGPT-4: frozen EVA ViT-g + Q-Former -> trainable projector (linear or VIB) -> frozen LLaMA/Vicuna.

One readable file in the spirit of nanoGPT: encode image -> project -> splice the visual tokens into the
prompt -> LM loss, or generate. The VIB math lives in `vib.py`; weight loading in `checkpoints.py`; building
from a config in `from_config.py`.
"""
from __future__ import annotations

import functools
import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from minigpt4.common.config import VIBConfig
from minigpt4.conversation.templates import Template
from minigpt4.models.numerics import NonFiniteLogitsGuard
from minigpt4.models.tokenization import SegmentTokenizer

log = logging.getLogger(__name__)


@dataclass
class TextBatch:
    """Token ids with reserved slots for the visual tokens (`image_mask`), right- or left-padded."""

    input_ids: torch.Tensor  # (B, L); image slots hold the pad id
    image_mask: torch.Tensor  # (B, L) bool, exactly N True per row
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor | None = None  # (B, L), -100 everywhere but the answer

    def repeat(self, times: int) -> "TextBatch":
        """Sample-major repetition (row s·B + b is image b), matching the VIB's flattened samples."""
        if times == 1:
            return self
        rep = lambda t: None if t is None else t.repeat(times, 1)  # noqa: E731
        return TextBatch(rep(self.input_ids), rep(self.image_mask), rep(self.attention_mask), rep(self.labels))

    def to(self, device: torch.device) -> "TextBatch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TextBatch(mv(self.input_ids), mv(self.image_mask), mv(self.attention_mask), mv(self.labels))


def foldable_head_input(head: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the LM head. When generating, transformers hands it `hidden[:, -1:]`, a (B, 1, d) view
    whose batch stride is the whole prompt's; torch.matmul cannot fold that into one (B, d) × (d, V) product, so it
    expands the head to (B, d, V), copies it and runs a bmm: B × 262 MB copied per prefill at 7B (1-2 s on a
    CPU, 80× the product itself). A fresh copy of the few hidden rows makes it one mm, with the same result."""
    hidden = args[0]
    if hidden.dim() == 3 and hidden.stride(0) != hidden.stride(1) * hidden.shape[1]:
        hidden = hidden.clone(memory_format=torch.contiguous_format)
    return (hidden, *args[1:])


def under_model_autocast(method):
    """Run `method` inside the model's own autocast (`MiniGPT4.autocast`; none unless model.precision asks)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.autocast():
            return method(self, *args, **kwargs)

    return wrapper


class MiniGPT4(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        llm: nn.Module,
        tokenizer,
        template: Template,
        *,
        end_sym: str | None = None,
        max_txt_len: int = 512,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.autocast_dtype = autocast_dtype  # model.precision: reference -> fp16 (models/precision.py)
        self.encoder = encoder
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = template
        self.end_sym = template.end_sym if end_sym is None else end_sym
        self.max_txt_len = max_txt_len
        self.num_query_tokens = encoder.num_query_tokens  # image slots in the prompt
        # Only the projector trains (MiniGPT-4 and AdaVIB freeze the ViT, Q-Former and LLM). A plain list, not a
        # child module: remembered for train().
        self._frozen = [self.llm, self.encoder]
        frozen = self._frozen
        for module in frozen:
            module.requires_grad_(False)
            module.eval()
        llm.get_output_embeddings().register_forward_pre_hook(foldable_head_input)
        if tokenizer is not None:
            if tokenizer.bos_token_id is None:
                name = getattr(tokenizer, "name_or_path", "")
                raise ValueError(f"the tokenizer {name!r} has no BOS token; MiniGPT-4 prompts start with BOS: "
                                 "use the LLM's own tokenizer (model.tokenizer_path)")
            if tokenizer.pad_token_id is None:
                # Vicuna ships without a pad token; pads are masked out, so any id works. Say so once.
                fallback = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
                log.warning("tokenizer has no pad token; using %r for padding (masked out everywhere)", fallback)
                tokenizer.pad_token = fallback
        # Prompt ids as the sources' slow SentencePiece LlamaTokenizer gave them (models/tokenization.py).
        self.prompt_tokenizer = SegmentTokenizer(tokenizer) if tokenizer is not None else None

    # ----------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> "MiniGPT4":
        super().train(mode)
        for module in self._frozen:  # frozen parts never leave eval mode (no dropout, fixed norms)
            module.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def embed_weight(self) -> torch.Tensor:
        return self.llm.get_input_embeddings().weight

    @property
    def vib(self) -> VIBConfig | None:
        """`model.vib` (β, S, ...), read from its one owner, the VIB projector; None for the linear projector."""
        return getattr(self.projector, "config", None)

    def autocast(self):
        """The sources' fp16 autocast around encoder, projector and LLM (MiniGPT-4 `maybe_autocast`, AdaVIB's
        Lightning '16-mixed') when `autocast_dtype` is set; otherwise nothing (the caller's autocast, if any)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -------------------------------------------------------------------------------------- images
    @under_model_autocast
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen ViT + Q-Former: (B, 3, H, W) -> (B, N, D). Run once per image, never per noise sample."""
        param = next(self.encoder.parameters())
        with torch.no_grad():
            return self.encoder(images.to(device=param.device, dtype=param.dtype))

    @under_model_autocast
    def project(self, features: torch.Tensor, num_samples: int | None = None) -> tuple[torch.Tensor, dict]:
        """Q-Former features -> LLM-space visual tokens (+ VIB statistics and the weighted KL term). A VIB
        projector in training draws model.vib.num_samples noise samples unless `num_samples` says otherwise."""
        proj_param = next(self.projector.parameters())
        return self.projector(features.to(device=proj_param.device, dtype=proj_param.dtype),
                              embed_weight=self.embed_weight, num_samples=num_samples)

    def generation_visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The visual tokens every decoding uses: the projection in eval mode (a VIB's μ, no sample), whatever
        mode the model is in; the mode is put back afterwards."""
        was_training = self.training
        self.eval()
        try:
            return self.project(features)[0]
        finally:
            self.train(was_training)

    def _features(self, batch: dict) -> torch.Tensor:
        if batch.get("image_features") is not None:  # cached Q-Former outputs (feature cache)
            return batch["image_features"]
        return self.encode_images(batch["image"])

    # ---------------------------------------------------------------------------------------- text
    def _ids(self, text: str) -> list[int]:
        return self.prompt_tokenizer.encode(text)

    def _split_prompt(self, prompt: str) -> tuple[list[int], list[int]]:
        return self.prompt_tokenizer.prompt_ids(prompt)  # [BOS] + segments before <ImageHere>, segments after

    def build_training_text(self, instructions: list[str | None], answers: list[str]) -> TextBatch:
        """[BOS] prompt-before <N image slots> prompt-after answer end_sym, right-padded; labels on the answer."""
        n, pad = self.num_query_tokens, self.tokenizer.pad_token_id
        rows = []
        for instruction, answer in zip(instructions, answers, strict=True):
            before, after = self._split_prompt(self.template.prompt(instruction))
            target = self._ids(answer + self.end_sym)[: self.max_txt_len]
            ids = before + [pad] * n + after + target
            labels = [-100] * (len(ids) - len(target)) + target
            slots = [False] * len(before) + [True] * n + [False] * (len(after) + len(target))
            rows.append((ids, labels, slots))
        width = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        image_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab, slots) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(lab)
            image_mask[i, : len(ids)] = torch.tensor(slots)
            attention[i, : len(ids)] = 1
        return TextBatch(input_ids, image_mask, attention, labels)

    def build_generation_text(self, prompts: list[str]) -> TextBatch:
        """Prompts with one <ImageHere> each -> left-padded ids (generation continues on the right)."""
        n, pad = self.num_query_tokens, self.tokenizer.pad_token_id
        rows = []
        for prompt in prompts:
            before, after = self._split_prompt(prompt)
            rows.append((before + [pad] * n + after, [False] * len(before) + [True] * n + [False] * len(after)))
        width = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        image_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, slots) in enumerate(rows):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            image_mask[i, width - len(ids):] = torch.tensor(slots)
            attention[i, width - len(ids):] = 1
        return TextBatch(input_ids, image_mask, attention)

    def embed(self, text: TextBatch, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the visual tokens scattered into the image slots (row-major order)."""
        embeds = self.llm.get_input_embeddings()(text.input_ids)
        expected = text.image_mask.sum().item()
        if visual_tokens.shape[0] * visual_tokens.shape[1] != expected:
            raise ValueError(f"{visual_tokens.shape[0]}×{visual_tokens.shape[1]} visual tokens for {expected} slots")
        # Under the model's own autocast the sources concatenate the visual tokens with the text embeddings, and
        # torch.cat promotes: AdaVIB's noisy z (μ + σ·ε, σ from an fp32 softplus) makes the LLM input fp32.
        dtype = torch.promote_types(embeds.dtype, visual_tokens.dtype) if self.autocast_dtype else embeds.dtype
        return embeds.to(dtype).masked_scatter(text.image_mask.unsqueeze(-1), visual_tokens.to(dtype))

    # ------------------------------------------------------------------------------------- forward
    @under_model_autocast
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: image (B,3,H,W) or image_features (B,N,D); answer list[str]; instruction list[str|None].

        Returns loss = ce + the projector's kl_term, β·mean(α·KL) (or β·mean(KL) when not adaptive), and its
        parts, all scalars.
        """
        features = self._features(batch)
        tokens, info = self.project(features)
        samples = tokens.shape[0] // features.shape[0]  # S in training, 1 when the projector does not sample
        instructions = batch.get("instruction") or [None] * features.shape[0]
        text = self.build_training_text(instructions, batch["answer"]).to(self.device).repeat(samples)
        embeds = self.embed(text, tokens)
        ce = self.answer_cross_entropy(embeds, text)
        kl_term = info.get("kl_term", torch.zeros((), device=ce.device)).to(ce.device)
        result = {"loss": ce + kl_term, "ce": ce.detach(), "kl_term": kl_term.detach()}
        for key in ("kl", "alpha", "entropy_ratio", "sigma"):
            if key in info:
                result[key] = info[key].detach().float().mean()
        result["num_tokens"] = torch.tensor(float((text.labels != -100).sum()))
        return result

    def answer_cross_entropy(self, embeds: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens, as `LlamaForCausalLM(labels=...)` computes it.

        Written out rather than passing `labels=` because the LM head and log-softmax over the vocabulary then run
        only where a label predicts an answer token: with SmolLM2's 49,152 words they were 12 % of a fine-tune step
        when computed at every prompt position too (assets/real_small_base/TRAINING.md).
        """
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=text.attention_mask).last_hidden_state
        next_labels = text.labels[:, 1:]
        predicting = next_labels != -100
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][predicting])
        return nn.functional.cross_entropy(logits.float(), next_labels[predicting])

    # ---------------------------------------------------------------------------------- generation
    @torch.no_grad()
    @under_model_autocast
    def generate(
        self,
        prompts: list[str],
        images: torch.Tensor | None = None,
        *,
        image_features: torch.Tensor | None = None,
        max_new_tokens: int = 256,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        min_new_tokens: int = 0,
        stop_strings: list[str] | None = None,
        streamer=None,
    ) -> list[str]:
        """Batched generation from inputs_embeds: left padding + attention mask, visual tokens = μ, each row
        stops on the template's end string (matched as text by transformers' StopStringCriteria, so no token
        id is hard-coded) or EOS; `stop_strings=[]` runs to EOS or max_new_tokens, as OPERA's beam search does.
        Returns the answers cut at the first end string, special tokens removed."""
        features = image_features if image_features is not None else self.encode_images(images)
        tokens = self.generation_visual_tokens(features)
        text = self.build_generation_text(prompts).to(self.device)
        embeds = self.embed(text, tokens)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=text.attention_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
            min_new_tokens=min_new_tokens,
            stop_strings=[self.end_sym] if stop_strings is None else (list(stop_strings) or None),
            tokenizer=self.tokenizer,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            streamer=streamer,
            logits_processor=[NonFiniteLogitsGuard(embeds.dtype)],  # NaN logits would decode to "" silently
            **sampling,
        )
        return [self.clean_answer(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def clean_answer(self, text: str) -> str:
        return (text.split(self.end_sym, 1)[0] if self.end_sym else text).strip()
