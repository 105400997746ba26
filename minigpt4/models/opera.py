"""OPERA (Huang et al., CVPR 2024): beam search with an over-trust penalty and retrospection-allocation.

This file holds the parameters, the scoring and one prompt's search state (beams, finished hypotheses, the
attention history and the rollback bookkeeping); minigpt4/models/opera_decoding.py drives the LLM for a batch of
prompts, minigpt4/models/last_layer_attention.py gets the last layer's attention probabilities.

Follows shikiw/OPERA: transformers-4.29.2/src/transformers/generation/utils.py (`opera_beam_search` and the
arguments `generate` passes it), minigpt4/models/mini_gpt4.py and minigpt4/models/llava.py (`key_position`: the
image tokens' first and last index, the response start = the prompt's length, for both MiniGPT-4 and LLaVA-1.5).
At each step, for each beam with g tokens generated:
  1. the candidates are the beam's top `num_attn_candidates` tokens by raw logit;
  2. each candidate is run one step further to get the LLM's last-layer attention row, maximum over heads; with the
     rows of the g generated tokens (kept from earlier steps), each row divided by its sum, the response block
     (rows and columns from the response start: g tokens and the candidate) is multiplied by `scale_factor`, and
     each column j scores 1e-7 · Π_{i ≥ j} block[i, j] (the column from the diagonal down); the candidate's
     over-trust score is the largest column score, at location j*;
  3. candidate score = logit − `penalty_weights` · over-trust score; for the first 10 response tokens instead
     logit + `penalty_weights` · (the candidate's attention to the image tokens);
  4. every other token gets −999, then log-softmax and one beam-search step;
  5. retrospection: when one location has been the "mode location" more than `threshold` times in the history of
     every beam, the search goes back to just after it and takes other tokens there.

Reproduced as the source does it, odd as it is:
  - candidates come from raw logits, and the log-softmax runs over the candidates' scores with −999 elsewhere, so a
    beam's log-probabilities are renormalised over its candidates: with the penalty at 0 this is plain beam search
    only when the candidates are the whole vocabulary (tests/test_opera.py checks that case);
  - the column scores are stored in float16 (the source's score buffer): below about 6e-8 they round to 0 (ties go
    to the first column), above 65504 they are +inf, and such a candidate's score becomes −inf;
  - "the first 10 response tokens": while the response with the candidate is at most 10 tokens long;
  - the mode location: per beam, the mode of its candidates' locations (this goes into the history); the rollback
    location is the mode of those over the beams. The source takes the second mode over the whole batch × beams;
    it runs one prompt at a time, so that is the prompt's beams, as here for each prompt of a batch;
  - the history is kept per beam ROW: it does not follow the beams when they are reordered;
  - no rollback to a location before the 10th response token; rolling back to position p = location + 1 is
    allowed `num_attn_candidates` times per position over the whole search, then p − 1 is tried (same limit);
    positions at or beyond `window_size` are never rolled back to (the source's counters have window_size entries
    and a larger index ends in its bare `except`: no rollback);
  - the state revived is that of iteration min(p, g − 1) (for locations in the last two positions the source goes
    back one step and still counts the rollback at p); the tokens chosen at that iteration before are rejected
    there, together with every token rejected at p before;
  - at the step after a rollback the scores are the whole vocabulary's raw logits shifted so that their minimum is
    −999, the rejected continuations at −999: no candidates, no penalty at that step;
  - after a rollback the KV cache is recomputed as the source recomputes it: one forward over the prompt and the
    kept tokens but the last, then one step on the last (opera_decoding.py).

Decided here, where the source is defective or does not apply:
  - beam bookkeeping (which hypotheses finish, length normalisation, when a prompt is done) is transformers 5's
    beam search (generation/utils.py `_beam_search`, length_penalty 1, early_stopping False), the same as this
    harness's plain beam search (protocol opera-chair-500-beam5), not 4.29.2's BeamSearchScorer that the source
    ran: OPERA and its beam baseline differ only by OPERA. With the penalty at 0, rollback impossible and every
    token a candidate, OPERA equals `generate(num_beams=...)` token for token;
  - a rollback revives a copy of the saved state. The source revives the saved beam scorer itself, which the search
    then updates, so a second rollback to the same iteration revived hypotheses finished on an abandoned branch;
  - on a rollback to p the tokens rejected at positions after p are forgotten (they belong to the abandoned branch).
    The source meant to (it clears `reject_token_pos_gather[-(j+1)]` while popping the states after p) but indexes
    that list from its END (positions window_size − 1, window_size − 2, ...), so stale rejects stayed;
  - a rollback whose target lies before the last `window_size` iterations is refused and changes nothing. The
    source clips the position, pops all but one saved state, then fails on an index inside its bare `except` and
    goes on with a broken history. Unreachable with window_size ≥ max_new_tokens (the defaults 512 / 512);
  - `penalty_weights` 0 takes no penalty at all (the source's 0 · inf is NaN where a score overflowed float16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

FIRST_TOKENS_BY_IMAGE_ATTENTION = 10  # source: `penalty_scores = -attn_scores if cur_response_lens <= 10`
EARLIEST_ROLLBACK_LOCATION = 10  # source: `if rollback_loc < 10: assert False`
COLUMN_SCORE_SCALE = 1e-7  # source: `local_score = 1e-7 * attn_local[..., j:, j].prod(-1)`
SCORE_DTYPE = torch.float16  # source: attn_local_scores = torch.zeros(..., dtype=torch.float16)
REJECTED = -999.0  # source: the score of every non-candidate token, and of rejected tokens after a rollback
# transformers 5 beam search as this harness runs it (MiniGPT4.generate): length_penalty 1, early_stopping False
LENGTH_PENALTY = 1.0
NOT_A_BEAM = -1.0e9


@dataclass(frozen=True)
class OperaDecoding:
    """The parameters of one OPERA run (shikiw/OPERA names; defaults of its generate and chair_eval.py)."""

    num_beams: int = 5
    scale_factor: float = 50.0
    threshold: int = 15
    num_attn_candidates: int = 5
    penalty_weights: float = 1.0
    window_size: int = 512


class PromptLayout(NamedTuple):
    """Where things are in one prompt without padding (the source's key_position)."""

    length: int  # the response starts here ("response_start")
    image_start: int  # first image token
    image_end: int  # last image token (inclusive, as the source's image_end)


def column_scores(history: torch.Tensor, candidates: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Over-trust column scores (beams, C, R) in float16 from the normalised attention rows of the g generated tokens
    over the response (beams, g, g; zero above the diagonal) and each candidate's row (beams, C, R = g + 1)."""
    beams, count, size = candidates.shape
    block = candidates.new_zeros(beams, count, size, size)
    block[:, :, :-1, :-1] = history[:, None]
    block[:, :, -1, :] = candidates
    block = scale_factor * block
    below = torch.ones(size, size, dtype=torch.bool, device=block.device).tril()  # row i ≥ column j
    products = torch.where(below, block, torch.ones_like(block)).prod(dim=-2)  # Π over i ≥ j of block[i, j]
    return (COLUMN_SCORE_SCALE * products).to(SCORE_DTYPE)


def rejection_scores(logits: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """A rollback step's scores: the raw logits (beams, V) shifted so their minimum is −999, and the rejected
    continuations (flat indices beam·V + token) at −999."""
    shifted = logits - (-REJECTED + logits.min(dim=-1, keepdim=True).values)
    flat = shifted.reshape(1, -1).scatter(-1, rejected.reshape(1, -1), REJECTED)
    return flat.reshape(logits.shape)


class _Saved(NamedTuple):
    """The search state at the start of an iteration (what the source keeps in `history_states`)."""

    running: torch.Tensor
    running_scores: torch.Tensor
    finished: tuple
    improvable: bool
    last_choice: Optional[tuple]


class PromptSearch:
    """One prompt's OPERA beam search. Per iteration the driver calls `start_iteration`, `add_step_row` (g ≥ 1),
    `score_candidates`, `plan_rollback` (and `roll_back`), then `select` with the step's log-probabilities."""

    def __init__(self, decoding: OperaDecoding, layout: PromptLayout, *, max_new_tokens: int, eos_token_id: int,
                 pad_token_id: int, device: torch.device):
        self.decoding, self.layout, self.max_new_tokens = decoding, layout, max_new_tokens
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        beams = decoding.num_beams
        # beams (transformers 5 _beam_search: only the first beam is live at the first step)
        self.running = torch.zeros((beams, 0), dtype=torch.long, device=device)
        self.running_scores = torch.full((beams,), NOT_A_BEAM, device=device)
        self.running_scores[0] = 0.0
        self.finished = (torch.full((beams, max_new_tokens), pad_token_id, dtype=torch.long, device=device),
                         torch.zeros(beams, dtype=torch.long, device=device),  # lengths
                         torch.full((beams,), NOT_A_BEAM, device=device),  # length-normalised scores
                         torch.zeros(beams, dtype=torch.bool, device=device))  # is a finished hypothesis
        self.improvable, self.done = True, False
        self.last_choice: Optional[tuple] = None  # (beam index, token) per beam, chosen at the last iteration
        # OPERA's history
        self.rows: list[torch.Tensor] = []  # rows[k]: normalised attention row of generated token k over the response
        self.parents: list[torch.Tensor] = []  # parents[k]: the beam (of the iteration before) row k continues
        self.attention: Optional[torch.Tensor] = None  # (beams, g, g): the rows of the current beams
        self.locations: list[torch.Tensor] = []  # per iteration: each beam row's mode location (beams,)
        self.rollbacks_at = torch.zeros(decoding.window_size)  # source: max_rollback_time
        self.rejected: dict[int, torch.Tensor] = {}  # source: reject_token_pos_gather
        self.saved: dict[int, _Saved] = {}  # iteration -> state at its start (the last window_size iterations)
        self.rollbacks = 0

    @property
    def generated(self) -> int:
        return self.running.shape[1]

    def start_iteration(self) -> None:
        g = self.generated
        self.saved[g] = _Saved(self.running, self.running_scores, self.finished, self.improvable, self.last_choice)
        for old in [k for k in self.saved if k <= g - self.decoding.window_size]:
            del self.saved[old]

    # ---------------------------------------------------------------------------------------------- attention
    def add_step_row(self, row: torch.Tensor) -> None:
        """The attention row (beams, prompt + g) of the token fed at this step (generated token g − 1), for the
        beams as reordered by the last choice."""
        normalised = row / row.sum(dim=-1, keepdim=True)
        self.rows.append(normalised[:, self.layout.length:])
        self.parents.append(self.last_choice[0])
        self.attention = self._extend(self.attention, self.rows[-1], self.parents[-1])

    @staticmethod
    def _extend(attention: Optional[torch.Tensor], row: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        if attention is None:
            return row[:, None, :]
        return torch.cat([F.pad(attention[parent], (0, 1)), row[:, None, :]], dim=1)

    def _replay(self, iterations: int) -> Optional[torch.Tensor]:
        attention = None
        for row, parent in zip(self.rows[:iterations], self.parents[:iterations]):
            attention = self._extend(attention, row, parent)
        return attention

    def score_candidates(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Penalised scores (beams, C) of the candidates with raw logits (beams, C) and attention rows
        (beams, C, prompt + g + 1); records each beam's mode location and returns the rollback location."""
        normalised = rows / rows.sum(dim=-1, keepdim=True)
        image = normalised[..., self.layout.image_start:self.layout.image_end + 1].sum(dim=-1)
        response = normalised[..., self.layout.length:]
        history = self.attention if self.attention is not None else response.new_zeros(response.shape[0], 0, 0)
        best, where = column_scores(history, response, self.decoding.scale_factor).max(dim=-1)
        beam_locations = where.mode(dim=-1).values
        self.locations.append(beam_locations)
        location = int(beam_locations.mode(dim=-1).values)
        penalty = -image if response.shape[-1] <= FIRST_TOKENS_BY_IMAGE_ATTENTION else best
        if self.decoding.penalty_weights == 0:
            return logits, location
        return logits - self.decoding.penalty_weights * penalty, location

    # ----------------------------------------------------------------------------------------------- rollback
    def plan_rollback(self, location: int) -> Optional[tuple[int, int]]:
        """(position p, iteration to revive) if the search rolls back now, else None (module docstring)."""
        history = torch.stack(self.locations, dim=-1)  # (beams, iterations)
        if not bool(((history == location).sum(dim=-1) > self.decoding.threshold).all()):
            return None
        if location < EARLIEST_ROLLBACK_LOCATION:
            return None
        position, limit, window = location + 1, self.decoding.num_attn_candidates, self.decoding.window_size
        if position >= window:
            return None
        if self.rollbacks_at[position] >= limit:
            position -= 1
            if self.rollbacks_at[position] >= limit:
                return None
        g = self.generated
        target = min(position, g - 1)
        if target < g + 1 - window:  # decision: not in the window kept (module docstring)
            return None
        self.rollbacks_at[position] += 1
        return position, target

    def roll_back(self, position: int, target: int, vocab_size: int) -> torch.Tensor:
        """Revive iteration `target`; returns the flat continuations (beam·V + token) rejected there."""
        parents, tokens = self.saved[target + 1].last_choice  # what iteration `target` chose before
        saved = self.saved[target]
        self.running, self.running_scores, self.finished = saved.running, saved.running_scores, saved.finished
        self.improvable, self.last_choice = saved.improvable, saved.last_choice
        self.saved = {k: v for k, v in self.saved.items() if k <= target}
        del self.rows[target:], self.parents[target:], self.locations[target + 1:]
        self.attention = self._replay(target)
        rejected = parents * vocab_size + tokens
        if position in self.rejected:
            rejected = torch.cat([self.rejected[position], rejected])
        self.rejected = {p: r for p, r in self.rejected.items() if p < position}  # decision: later ones are stale
        self.rejected[position] = rejected
        self.rollbacks += 1
        return rejected

    # -------------------------------------------------------------------------------------------- beam search
    def select(self, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of transformers 5's beam search (`_beam_search`: `_get_top_k_continuations`,
        `_get_running_beams_for_next_iteration`, `_update_finished_beams`, `_check_early_stop_heuristic`) over
        the step's processed log-probabilities (beams, V). Returns the (beam index, token) of each next beam."""
        beams, vocab = log_probs.shape
        top_scores, top_index = _top((log_probs + self.running_scores[:, None]).reshape(-1), 2 * beams)  # one EOS id
        parents, tokens = top_index // vocab, top_index % vocab
        sequences = torch.cat([self.running[parents], tokens[:, None]], dim=1)
        length = sequences.shape[1]
        hits = (tokens == self.eos_token_id) | (length >= self.max_new_tokens)  # EOS and max-length criteria
        running_scores = top_scores + hits.to(torch.float32) * NOT_A_BEAM
        order = _top(running_scores, beams)[1]
        self._update_finished(sequences, top_scores, hits, beams)
        self.running, self.running_scores = sequences[order], running_scores[order]
        self.last_choice = (parents[order], tokens[order])
        _, _, scores, is_finished = self.finished
        best_running = self.running_scores[:1] / (length ** LENGTH_PENALTY)
        worst_finished = torch.where(is_finished, scores.min(), torch.full_like(scores, NOT_A_BEAM))
        self.improvable = self.improvable and bool((best_running > worst_finished).any())
        self.done = not self.improvable or bool(hits.all())
        return self.last_choice

    def _update_finished(self, sequences: torch.Tensor, top_scores: torch.Tensor, hits: torch.Tensor,
                         beams: int) -> None:
        """Hypotheses that end now, if among the best `beams`, join the finished ones (the best `beams` kept)."""
        tokens, lengths, scores, is_finished = self.finished
        length = sequences.shape[1]
        just_finished = hits & (torch.arange(hits.shape[0], device=hits.device) < beams)
        # (transformers also takes NOT_A_BEAM off when no improvement is possible; a prompt is done then: not here)
        candidates = top_scores / (length ** LENGTH_PENALTY)
        candidates = candidates + (~just_finished).to(torch.float32) * NOT_A_BEAM
        merged_scores = torch.cat([scores, candidates])
        best = _top(merged_scores, beams)[1]
        padded = F.pad(sequences, (0, self.max_new_tokens - length), value=self.pad_token_id)
        self.finished = (torch.cat([tokens, padded])[best],
                         torch.cat([lengths, torch.full_like(top_scores, length, dtype=torch.long)])[best],
                         merged_scores[best], torch.cat([is_finished, just_finished])[best])

    def answer(self) -> list[int]:
        """The best finished hypothesis (transformers returns `sequences[:, 0]`)."""
        tokens, lengths, _, _ = self.finished
        return tokens[0, :int(lengths[0])].tolist()


def _top(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk over a 1-D tensor taken as one batch row, as transformers' beam search calls it (ties go the same
    way as there)."""
    top = torch.topk(values[None], k)
    return top.values[0], top.indices[0]
