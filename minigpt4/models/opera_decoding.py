"""OPERA decoding for a batch of prompts: the loop that drives the LLM. The method, its source and every decision
are in minigpt4/models/opera.py; the last layer's attention comes from minigpt4/models/last_layer_attention.py.

The prompts' beams run as one batch: rows prompt-major (num_beams per prompt), left-padded, one KV cache, a 2-D
attention mask, position ids from the mask as transformers' generate makes them. Each prompt has its own search
(its candidates, history, rollbacks and finished hypotheses) and leaves the batch when it is done. Per step:
  1. every row's candidates are run one step each, recording the last layer's attention row (the cache is cropped
     back after each, as the source's candidate passes leave its cache as it was);
  2. per prompt: the candidates' scores, the rollback decision, the step's scores (the candidates' scores with −999
     elsewhere, or after a rollback the revived beams' recomputed logits), one beam-search step;
  3. the cache rows are reordered to the chosen beams (finished prompts' rows dropped) and the chosen tokens run one
     step, recording their attention rows.
A rollback recomputes that prompt's rows of the cache as the source does (one forward over the prompt and the
kept tokens but the last, then one step on the last) and writes them into its rows right-aligned, the columns
before becoming masked padding. So no answer depends on the other prompts of its batch: batched equals batch
size 1 token for token (tests/test_opera.py), where the source decodes one prompt at a time.

Cost per step: 1 + num_attn_candidates one-token passes over all beams (the source's), against 1 for plain beam
search; a rollback adds one pass over that prompt's prompt and kept tokens.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache, MinNewTokensLengthLogitsProcessor

from minigpt4.models.contrastive_decoding import cache_keyword
from minigpt4.models.last_layer_attention import LastLayerAttention
from minigpt4.models.numerics import NonFiniteLogitsGuard
from minigpt4.models.opera import REJECTED, OperaDecoding, PromptLayout, PromptSearch, rejection_scores


class _BeamRows:
    """The active prompts' beams as one batch: `prompts` in row-block order, `mask` (rows, columns), `cache`."""

    def __init__(self, llm, beams: int, embeds: torch.Tensor, mask: torch.Tensor):
        self.llm, self.beams = llm, beams
        self.prompts = list(range(embeds.shape[0]))
        self.prompt_embeds = [embeds[row, mask[row].bool()] for row in self.prompts]  # without padding
        self.mask = mask
        self.cache = DynamicCache(config=llm.config)
        self.cache_key = cache_keyword(llm)

    def _run(self, cache=None, **inputs) -> torch.Tensor:
        out = self.llm(**inputs, use_cache=True, logits_to_keep=1,
                       **{self.cache_key: self.cache if cache is None else cache})
        return out.logits[:, -1].float()

    def block(self, prompt: int) -> slice:
        start = self.prompts.index(prompt) * self.beams
        return slice(start, start + self.beams)

    def length(self, prompt: int) -> int:
        """Columns the prompt's rows attend to: its prompt and generated tokens."""
        return int(self.mask[self.block(prompt).start].sum())

    def prefill(self, embeds: torch.Tensor) -> torch.Tensor:
        """The prompts once each, then every row repeated for the beams; the first step's logits (rows, V)."""
        positions = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 0)
        logits = self._run(inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions)
        self.cache.batch_repeat_interleave(self.beams)
        self.mask = self.mask.repeat_interleave(self.beams, dim=0)
        return logits.repeat_interleave(self.beams, dim=0)

    def step(self, tokens: torch.Tensor, probe: LastLayerAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one token per row; (logits (rows, V), last-layer attention (rows, columns) of these tokens)."""
        mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        positions = self.mask.sum(dim=-1, keepdim=True)
        with probe.recording(mask):
            logits = self._run(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions)
        self.mask = mask
        return logits, probe.probabilities

    def try_step(self, tokens: torch.Tensor, probe: LastLayerAttention) -> torch.Tensor:
        """A step whose attention is all that is kept: the cache and mask are as before afterwards."""
        probabilities = self.step(tokens, probe)[1]
        self.cache.crop(-1)
        self.mask = self.mask[:, :-1]
        return probabilities

    def keep(self, prompts: list[int], rows: torch.Tensor) -> None:
        """Continue with `prompts`, their rows taken from `rows` (the chosen beams, in order)."""
        self.prompts = prompts
        if prompts:
            self.cache.reorder_cache(rows)
            self.mask = self.mask[rows]

    def recompute(self, prompt: int, tokens: torch.Tensor) -> torch.Tensor:
        """The prompt's rows of the cache for its beams `tokens` (beams, t), as the source recomputes them after a
        rollback; returns the logits for token t (beams, V)."""
        beams, kept = tokens.shape
        embeds = self.prompt_embeds[prompt].expand(beams, -1, -1)
        inputs = torch.cat([embeds, self.llm.get_input_embeddings()(tokens[:, :-1])], dim=1)
        length = inputs.shape[1]
        ones = torch.ones((beams, length + 1), dtype=self.mask.dtype, device=self.mask.device)
        fresh = DynamicCache(config=self.llm.config)
        positions = torch.arange(length + 1, device=self.mask.device).expand(beams, -1)
        self._run(fresh, inputs_embeds=inputs, attention_mask=ones[:, :-1], position_ids=positions[:, :-1])
        logits = self._run(fresh, input_ids=tokens[:, -1:], attention_mask=ones, position_ids=positions[:, -1:])
        self._write_rows(self.block(prompt), fresh)
        return logits

    def _write_rows(self, block: slice, fresh: DynamicCache) -> None:
        """`fresh` right-aligned into the rows of `block`; the columns before it are zero and masked."""
        width = self.mask.shape[1]
        for layer, new in zip(self.cache.layers, fresh.layers):
            start = width - new.keys.shape[-2]
            for old, value in ((layer.keys, new.keys), (layer.values, new.values)):
                old[block, :, :start] = 0
                old[block, :, start:] = value
        start = width - fresh.get_seq_length()
        self.mask[block] = 0
        self.mask[block, start:] = 1


def prompt_layout(text, row: int) -> PromptLayout:
    """The source's key_position of one prompt of a TextBatch: its length and its image tokens' span."""
    valid = text.attention_mask[row].bool()
    image = text.image_mask[row][valid].nonzero().flatten()
    return PromptLayout(length=int(valid.sum()), image_start=int(image[0]), image_end=int(image[-1]))


@torch.no_grad()
def opera_token_ids(model, prompts: list[str], features: torch.Tensor, decoding: OperaDecoding, *,
                    max_new_tokens: int, min_new_tokens: int = 0) -> list[list[int]]:
    """The new token ids of OPERA's answer to each prompt (encoder outputs `features`), EOS included when reached."""
    llm, tokenizer = model.llm, model.tokenizer
    vocab = llm.get_output_embeddings().weight.shape[0]
    if decoding.num_attn_candidates > vocab:
        raise ValueError(f"num_attn_candidates = {decoding.num_attn_candidates} exceeds the vocabulary ({vocab})")
    with model.autocast(), LastLayerAttention(llm) as probe:
        text = model.build_generation_text(prompts).to(model.device)
        embeds = model.embed(text, model.generation_visual_tokens(features))
        rows = _BeamRows(llm, decoding.num_beams, embeds, text.attention_mask)
        searches = [PromptSearch(decoding, prompt_layout(text, row), max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                 device=model.device) for row in range(len(prompts))]
        step = _Step(rows, probe, decoding, NonFiniteLogitsGuard(embeds.dtype),
                     MinNewTokensLengthLogitsProcessor(0, min_new_tokens, tokenizer.eos_token_id, device=model.device))
        logits = rows.prefill(embeds)
        while rows.prompts:
            logits = step(searches, logits)
    return [search.answer() for search in searches]


class _Step:
    """One step of every active prompt's search (module docstring)."""

    def __init__(self, rows: _BeamRows, probe: LastLayerAttention, decoding: OperaDecoding,
                 guard: NonFiniteLogitsGuard, ban_eos: MinNewTokensLengthLogitsProcessor):
        self.rows, self.probe, self.decoding, self.guard, self.ban_eos = rows, probe, decoding, guard, ban_eos

    def __call__(self, searches: list[PromptSearch], logits: torch.Tensor) -> torch.Tensor | None:
        rows = self.rows
        for prompt in rows.prompts:
            searches[prompt].start_iteration()
            self.guard(searches[prompt].running, logits[rows.block(prompt)])
        top_logits, top_tokens = torch.topk(logits, self.decoding.num_attn_candidates, dim=-1)
        attention = torch.stack([rows.try_step(top_tokens[:, c], self.probe)
                                 for c in range(self.decoding.num_attn_candidates)], dim=1)  # (rows, C, columns)
        kept, chosen_rows, chosen_tokens = [], [], []
        for prompt in rows.prompts:
            search, block = searches[prompt], rows.block(prompt)
            scores = self._scores(prompt, search, logits[block], top_logits[block], top_tokens[block],
                                  attention[block, :, -(rows.length(prompt) + 1):])
            log_probs = self.ban_eos(search.running, torch.log_softmax(scores, dim=-1))
            parents, tokens = search.select(log_probs)
            if not search.done:
                kept.append(prompt)
                chosen_rows.append(block.start + parents)
                chosen_tokens.append(tokens)
        rows.keep(kept, torch.cat(chosen_rows) if kept else torch.empty(0, dtype=torch.long))
        if not kept:
            return None
        logits, attention = rows.step(torch.cat(chosen_tokens), self.probe)
        for prompt in kept:
            searches[prompt].add_step_row(attention[rows.block(prompt), -rows.length(prompt):])
        return logits

    def _scores(self, prompt: int, search: PromptSearch, logits: torch.Tensor, top_logits: torch.Tensor,
                top_tokens: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The step's scores (beams, V) of one prompt: its candidates' (−999 elsewhere), or after a rollback the
        shifted logits of the revived beams with the rejected continuations at −999."""
        candidate_scores, location = search.score_candidates(top_logits, attention)
        plan = search.plan_rollback(location)
        if plan is None:
            return torch.full_like(logits, REJECTED).scatter(-1, top_tokens, candidate_scores)
        rejected = search.roll_back(*plan, vocab_size=logits.shape[-1])
        revived = self.rows.recompute(prompt, search.running)
        self.guard(search.running, revived)
        return rejection_scores(revived, rejected)


def generate_opera(model, prompts: list[str], features: torch.Tensor, decoding: OperaDecoding, *,
                   max_new_tokens: int, min_new_tokens: int = 0) -> list[str]:
    """OPERA answers, decoded and cut at the end string as MiniGPT4.generate returns its answers."""
    ids = opera_token_ids(model, prompts, features, decoding, max_new_tokens=max_new_tokens,
                          min_new_tokens=min_new_tokens)
    return [model.clean_answer(model.tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in ids]
