"""OPERA (issue 25): the implementation (minigpt4/models/opera*.py) against a step-by-step transcription of the
source's `opera_beam_search` written here at batch size 1 (slow, plain code: no KV cache, transformers' eager
attention with output_attentions), with rollbacks; batched against batch size 1 token for token (MiniGPT-4 and
LLaVA-1.5); penalty 0 without rollback against transformers' beam search; the pieces and the decisions by hand.
The evaluation's side (settings, label, fingerprint, evaluate.py) is tests/test_opera_eval.py."""
from __future__ import annotations

import copy

import pytest
import torch
from _model_checks import toy_batch

from minigpt4.models.opera import OperaDecoding, PromptLayout, PromptSearch, column_scores, rejection_scores
from minigpt4.models.opera_decoding import opera_token_ids

PROMPTS = ["###Human: <Img><ImageHere></Img> Describe this image.###Assistant:",
           "A chat. ###Human: <Img><ImageHere></Img> Is there a dog in the image? Answer please.###Assistant:"]
LLAVA_PROMPTS = ["USER: <ImageHere>\nDescribe this image. ASSISTANT:",
                 "A chat. USER: <ImageHere>\nIs there a dog in the image? Answer please. ASSISTANT:"]


# ---- the source, transcribed ----------------------------------------------------------------------------------------
class SourceTranscription:
    """shikiw/OPERA transformers-4.29.2/src/transformers/generation/utils.py `opera_beam_search` at batch size 1,
    step by step under its own variable names, every forward pass over the whole sequence (no KV cache) with
    transformers' eager attention. Where minigpt4/models/opera.py decided against the source, this does what was
    decided (marked DECISION): transformers 5's beam bookkeeping instead of 4.29's BeamSearchScorer, a revived state
    copied, stale rejects cleared, a rollback outside the window refused, no penalty at weight 0."""

    def __init__(self, model, prompt: str, features: torch.Tensor, decoding: OperaDecoding, max_new_tokens: int):
        self.model, self.d, self.max_new_tokens = model, decoding, max_new_tokens
        text = model.build_generation_text([prompt])
        self.prompt_embeds = model.embed(text, model.generation_visual_tokens(features))
        image = text.image_mask[0].nonzero().flatten()
        self.key_position = {"image_start": int(image[0]), "image_end": int(image[-1]),
                             "response_start": self.prompt_embeds.shape[1]}  # mini_gpt4.py / llava.py
        self.eos = model.tokenizer.eos_token_id
        self.rollbacks: list[tuple[int, int, int]] = []  # (tokens generated, rollback_pos, iteration revived)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the last position and the last layer's attention, for prompt + input_ids (beams, g)."""
        llm = self.model.llm
        embeds = torch.cat([self.prompt_embeds.expand(input_ids.shape[0], -1, -1),
                            llm.get_input_embeddings()(input_ids)], dim=1)
        out = llm(inputs_embeds=embeds, output_attentions=True)
        return out.logits[:, -1].float(), out.attentions[-1]

    def run(self) -> list[int]:
        d, num_beams = self.d, self.d.num_beams
        input_ids = torch.zeros((num_beams, 0), dtype=torch.long)
        beam_scores = torch.zeros(num_beams)
        beam_scores[1:] = -1e9
        self.finished: list[tuple[torch.Tensor, list[int]]] = []  # (length-normalised score, tokens)
        history_states, history_rollback_locs = [], []
        beam_next_tokens = beam_idx = attn_previous = None
        max_rollback_time = torch.zeros(d.window_size)
        reject_token_pos_gather = [[] for _ in range(d.window_size)]
        while True:
            current_state = {"input_ids": input_ids.clone(), "beam_scores": beam_scores.clone(),
                             "finished": copy.deepcopy(self.finished)}
            logits, attentions = self.forward(input_ids)
            if attn_previous is None:  # no past_key_values yet: the whole prompt's attention
                attn_previous = attentions.clone()
            else:
                attn_previous = torch.cat([attn_previous, torch.zeros_like(attn_previous).sum(-1, keepdim=True)], -1)
                attn_previous = torch.cat([attn_previous[beam_idx],
                                           attentions[:, :, -1:].clone().max(1, keepdim=True).values], -2)
            attn_previous = attn_previous.max(1, keepdim=True).values
            current_state["attn_previous"] = attn_previous
            candidate_token_scores, candidate_tokens = torch.topk(logits, d.num_attn_candidates, dim=-1)
            current_state["beam_next_tokens"], current_state["beam_idx"] = beam_next_tokens, beam_idx
            candidate_token_scores, rollback_loc, locs = self.penalise(input_ids, attn_previous,
                                                                       candidate_token_scores, candidate_tokens)
            history_rollback_locs.append(locs[:, None])
            if len(history_states) >= d.window_size:
                history_states.pop(0)
            history_states.append(current_state)
            next_token_logits, revived = self.rollback(
                rollback_loc, torch.cat(history_rollback_locs, -1), history_states, history_rollback_locs,
                max_rollback_time, reject_token_pos_gather, input_ids.shape[1], logits.shape[-1])
            if revived is not None:
                input_ids, beam_scores, attn_previous = revived
            else:
                next_token_logits = torch.full_like(logits, -999.0).scatter(-1, candidate_tokens,
                                                                            candidate_token_scores)
            next_token_scores = torch.log_softmax(next_token_logits, dim=-1)
            done, input_ids, beam_scores, beam_idx, beam_next_tokens = self.beam_step(
                input_ids, next_token_scores + beam_scores[:, None])
            if done:
                return max(self.finished, key=lambda f: float(f[0]))[1]

    def penalise(self, input_ids, attn_previous, candidate_token_scores, candidate_tokens):
        d, key_position = self.d, self.key_position
        attn_last = []
        for candidate_id in range(d.num_attn_candidates):
            _, attentions = self.forward(torch.cat([input_ids, candidate_tokens[:, candidate_id:candidate_id + 1]],
                                                   dim=-1))
            attn_output = attentions[:, :, -1:].clone().max(1, keepdim=True).values
            attn_square = torch.cat([attn_previous, torch.zeros_like(attn_previous).sum(-1, keepdim=True)], -1)
            attn_last.append(torch.cat([attn_square, attn_output], -2))
        attn_last = torch.cat(attn_last, 1)
        attn_last = attn_last / attn_last.sum(-1, keepdim=True)
        attn_local = attn_last[:, :, key_position["response_start"]:, key_position["response_start"]:]
        attn_local = d.scale_factor * attn_local
        attn_local_scores = torch.zeros((attn_local.shape[0], attn_local.shape[1], attn_local.shape[-1]),
                                        dtype=torch.float16)
        for j in range(attn_local.shape[-1]):
            local_score = 1e-7 * attn_local[..., j:, j].prod(-1).data
            attn_local_scores[..., j] = local_score.to(torch.float32)
        cur_response_lens = attn_local.shape[-1]
        attn_i = attn_last[:, :, -1, key_position["image_start"]:key_position["image_end"] + 1].sum(-1)
        rollback_scores, rollback_locs = attn_local_scores.max(-1)
        rollback_loc = rollback_locs.mode().values.data
        rollback_loc = rollback_loc.mode().values.data
        penalty_scores = -attn_i if cur_response_lens <= 10 else rollback_scores
        if d.penalty_weights != 0:  # DECISION: the source's 0 · inf is NaN
            candidate_token_scores = candidate_token_scores - d.penalty_weights * penalty_scores
        return candidate_token_scores, int(rollback_loc), rollback_locs.mode().values.data

    def rollback(self, rollback_loc, rollback_loc_gathers, history_states, history_rollback_locs,
                 max_rollback_time, reject_token_pos_gather, generated, vocab_size):
        """The source's `try:` block: (next_token_logits, revived state) after a rollback, else (None, None)."""
        d = self.d
        if not all((gather == rollback_loc).long().sum() > int(d.threshold) for gather in rollback_loc_gathers):
            return None, None
        if rollback_loc < 10:
            return None, None
        rollback_pos = rollback_loc + 1
        if rollback_pos >= d.window_size:  # max_rollback_time[rollback_pos]: IndexError, caught
            return None, None
        if max_rollback_time[rollback_pos] >= d.num_attn_candidates:
            rollback_pos = rollback_pos - 1
            if max_rollback_time[rollback_pos] >= d.num_attn_candidates:
                return None, None
        cur_response_lens = generated + 1
        pops = max(0, cur_response_lens - rollback_pos - 2)
        if len(history_states) - pops < 2:  # DECISION: the source would pop, then fail on history_states[-2]
            return None, None
        max_rollback_time[rollback_pos] += 1
        for _ in range(pops):
            history_states.pop(-1)
            history_rollback_locs.pop(-1)
        for position in range(rollback_pos + 1, d.window_size):  # DECISION: the source clears [-(j+1)]
            reject_token_pos_gather[position] = []
        state = history_states[-2]
        input_ids, beam_scores = state["input_ids"], state["beam_scores"]
        self.finished = copy.deepcopy(state["finished"])  # DECISION: the source revives the scorer itself
        beam_next_tokens, beam_idx = history_states[-1]["beam_next_tokens"], history_states[-1]["beam_idx"]
        next_token_logits, _ = self.forward(input_ids)
        history_states.pop(-1)
        history_rollback_locs.pop(-1)
        next_token_logits = next_token_logits - (999. + next_token_logits.min(-1, keepdim=True).values)
        reject_token_pos = (beam_idx * vocab_size + beam_next_tokens)[None]
        if len(reject_token_pos_gather[rollback_pos]) > 0:
            reject_token_pos = torch.cat([reject_token_pos_gather[rollback_pos], reject_token_pos], -1)
        reject_token_pos_gather[rollback_pos] = reject_token_pos
        next_token_logits = next_token_logits.reshape(1, -1).scatter(-1, reject_token_pos, -999.)
        self.rollbacks.append((generated, rollback_pos, input_ids.shape[1]))
        return next_token_logits.reshape(-1, vocab_size), (input_ids, beam_scores, state["attn_previous"])

    def beam_step(self, input_ids, scores):
        """DECISION: transformers 5's beam search step (generation/utils.py `_beam_search`), written out."""
        num_beams, vocab_size = scores.shape
        top_scores, top_index = torch.topk(scores.reshape(1, -1), 2 * num_beams)
        candidates = []
        for rank, (score, index) in enumerate(zip(top_scores[0], top_index[0].tolist())):
            tokens = input_ids[index // vocab_size].tolist() + [index % vocab_size]
            ends = tokens[-1] == self.eos or len(tokens) >= self.max_new_tokens
            candidates.append((score, tokens, ends, index // vocab_size, rank))
            if ends and rank < num_beams:  # a hypothesis ends among the best num_beams: it is kept if good enough
                self.finished.append((score / len(tokens), tokens))
        self.finished = sorted(self.finished, key=lambda f: -float(f[0]))[:num_beams]
        running = sorted(candidates, key=lambda c: (c[2], -float(c[0]), c[4]))[:num_beams]  # unfinished first
        beam_scores = torch.stack([c[0] + (-1e9 if c[2] else 0.0) for c in running])
        length = len(running[0][1])
        improvable = len(self.finished) < num_beams or bool(beam_scores[0] / length > self.finished[-1][0])
        done = not improvable or all(c[2] for c in candidates)
        beam_idx = torch.tensor([c[3] for c in running])
        next_tokens = torch.tensor([c[1][-1] for c in running])
        return done, torch.tensor([c[1] for c in running]), beam_scores, beam_idx, next_tokens


# ---- models ---------------------------------------------------------------------------------------------------------
def tiny_minigpt4(tiny_tokenizer_dir: str, seed: int = 0, projector: str = "vib"):
    """A tiny random MiniGPT-4 whose LLM attention has biases (for `summary_token`)."""
    from minigpt4.common.tiny_models import TINY_LLM, tiny_model_config
    from minigpt4.models.from_config import build_model

    torch.manual_seed(seed)
    return build_model(tiny_model_config(tiny_tokenizer_dir, projector, llm=dict(TINY_LLM, attention_bias=True))).eval()


def summary_token(model, token: int, strength: float) -> None:
    """Make `token` a summary token of the last layer: every later position attends to it strongly, as OPERA's
    "knowledge aggregation" pattern (the tiny random model's attention is nearly uniform otherwise, so the first or
    the last column always wins and no rollback goes back to a location ≥ 10). Its input embedding becomes one large
    coordinate; in the last layer's slowest rotary pair (nearly position-free) every query is a constant and only
    that coordinate makes a key."""
    llm = model.llm
    attention = llm.get_decoder().layers[-1].self_attn
    head_dim = attention.head_dim
    with torch.no_grad():
        embedding = llm.get_input_embeddings().weight
        embedding[token] = 0
        embedding[token, 0] = 100.0
        for head in range(llm.config.num_attention_heads):
            for row in (head * head_dim + head_dim // 2 - 1, head * head_dim + head_dim - 1):
                attention.q_proj.weight[row], attention.q_proj.bias[row] = 0, 1.0
                attention.k_proj.weight[row], attention.k_proj.bias[row] = 0, 0
                attention.k_proj.weight[row, 0] = strength


class eager_attention:
    """The transcription reads transformers' own eager attention weights (output_attentions)."""

    def __init__(self, model):
        self.llm = model.llm

    def __enter__(self):
        self.llm.set_attn_implementation("eager")

    def __exit__(self, *exc):
        self.llm.set_attn_implementation("sdpa")


def transcribed(model, prompt: str, features: torch.Tensor, decoding: OperaDecoding, max_new_tokens: int):
    reference = SourceTranscription(model, prompt, features, decoding, max_new_tokens)
    with torch.no_grad(), eager_attention(model):
        return reference.run(), reference.rollbacks


# Found by a search over seeds, rows, summary tokens and settings (the token is the one the plain search puts at
# response position 10): each gives rollbacks to a location ≥ 10, among them one where the position's limit is
# reached and the position before is taken.
ROLLBACK_CASES = [
    dict(row=0, token=355, strength=0.6, decoding=OperaDecoding(num_beams=3, num_attn_candidates=3, threshold=1,
                                                                scale_factor=20.0)),
    dict(row=1, token=392, strength=0.3, decoding=OperaDecoding(num_beams=3, num_attn_candidates=3, threshold=1,
                                                                scale_factor=20.0)),
]


def _record_rollbacks(monkeypatch) -> list[tuple[int, int, int]]:
    """(tokens generated, position, iteration revived) of every rollback the implementation makes."""
    events: list[tuple[int, int, int]] = []
    original = PromptSearch.roll_back

    def recorded(self, position, target, vocab_size):
        events.append((self.generated, position, target))
        return original(self, position, target, vocab_size)

    monkeypatch.setattr(PromptSearch, "roll_back", recorded)
    return events


# ---- against the source ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ROLLBACK_CASES, ids=["row0", "row1"])
def test_the_implementation_follows_the_source_through_rollbacks(tiny_tokenizer_dir, monkeypatch, case):
    """Token for token and rollback for rollback against the transcription, at batch size 1. Each case rolls back
    several times, to a location ≥ 10, until the position's limit (3 candidates = 3 rollbacks) moves it one back."""
    model = tiny_minigpt4(tiny_tokenizer_dir)
    summary_token(model, case["token"], case["strength"])
    row, decoding = case["row"], case["decoding"]
    features = model.encode_images(toy_batch()["image"])[row:row + 1]
    expected, expected_rollbacks = transcribed(model, PROMPTS[row], features, decoding, 24)
    rollbacks = _record_rollbacks(monkeypatch)
    got = opera_token_ids(model, PROMPTS[row:row + 1], features, decoding, max_new_tokens=24)[0]
    assert got == expected
    assert rollbacks == expected_rollbacks
    positions = [position for _, position, _ in rollbacks]
    assert all(revived == position for _, position, revived in rollbacks)  # back to just after the location
    assert positions.count(positions[0]) == decoding.num_attn_candidates and positions[-1] == positions[0] - 1


def test_llava_follows_the_source(tiny_tokenizer_dir):
    """LLaVA-1.5's prompt layout (image tokens after the system text) and no rollback, the README's default
    threshold: the penalty alone against the transcription."""
    model = _tiny_llava(tiny_tokenizer_dir)
    features = model.encode_images(toy_batch()["image"])
    decoding = OperaDecoding(num_beams=3, num_attn_candidates=3)
    for row in range(2):
        expected, rollbacks = transcribed(model, LLAVA_PROMPTS[row], features[row:row + 1], decoding, 14)
        assert opera_token_ids(model, LLAVA_PROMPTS[row:row + 1], features[row:row + 1], decoding,
                               max_new_tokens=14)[0] == expected and not rollbacks


def _tiny_llava(tiny_tokenizer_dir: str):
    from test_llava import tiny_llava_config

    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)
    return build_model(tiny_llava_config(tiny_tokenizer_dir, "vib", vib=dict(num_samples=2, beta=1e-2,
                                                                             adaptive=False))).eval()


# ---- batching -------------------------------------------------------------------------------------------------------
def test_batched_answers_equal_batch_one_answers_with_rollbacks(tiny_tokenizer_dir, monkeypatch):
    """Prompts of different lengths, one rolling back several times while the other does not: each answer equals
    its batch-1 answer (the source decodes one prompt at a time)."""
    model = tiny_minigpt4(tiny_tokenizer_dir)
    case = ROLLBACK_CASES[1]
    summary_token(model, case["token"], case["strength"])
    features = model.encode_images(toy_batch(3)["image"])
    prompts = [PROMPTS[1], PROMPTS[0], "###Human: <Img><ImageHere></Img> What is this?###Assistant:"]
    rollbacks = _record_rollbacks(monkeypatch)
    batched = opera_token_ids(model, prompts, features, case["decoding"], max_new_tokens=20)
    assert len(rollbacks) >= 2
    for row, prompt in enumerate(prompts):
        assert opera_token_ids(model, [prompt], features[row:row + 1], case["decoding"],
                               max_new_tokens=20)[0] == batched[row], row


def test_batched_answers_equal_batch_one_answers_llava(tiny_tokenizer_dir):
    model = _tiny_llava(tiny_tokenizer_dir)
    features = model.encode_images(toy_batch()["image"])
    decoding = OperaDecoding(num_beams=2, num_attn_candidates=2, threshold=1, scale_factor=20.0)
    batched = opera_token_ids(model, LLAVA_PROMPTS, features, decoding, max_new_tokens=16)
    for row, prompt in enumerate(LLAVA_PROMPTS):
        assert opera_token_ids(model, [prompt], features[row:row + 1], decoding, max_new_tokens=16)[0] == batched[row]


# ---- plain beam search ----------------------------------------------------------------------------------------------
def test_no_penalty_no_rollback_and_every_token_a_candidate_is_plain_beam_search(tiny_model_factory):
    """Penalty weight 0, a threshold no history can pass, and the whole vocabulary as candidates (with fewer, the
    source's log-softmax over the candidates renormalises each beam): transformers' beam search token for token,
    a hypothesis ending at EOS included."""
    model = tiny_model_factory("vib").eval()
    features = model.encode_images(toy_batch()["image"])[1:]
    vocab = model.llm.lm_head.weight.shape[0]
    decoding = OperaDecoding(num_beams=3, num_attn_candidates=vocab, threshold=8, penalty_weights=0.0)
    ours = opera_token_ids(model, PROMPTS[1:], features, decoding, max_new_tokens=8)[0]
    with torch.no_grad():
        text = model.build_generation_text(PROMPTS[1:])
        embeds = model.embed(text, model.generation_visual_tokens(features))
        plain = model.llm.generate(inputs_embeds=embeds, attention_mask=text.attention_mask, num_beams=3,
                                   max_new_tokens=8, do_sample=False, eos_token_id=model.tokenizer.eos_token_id,
                                   pad_token_id=model.tokenizer.pad_token_id)[0].tolist()
    assert ours[-1] == model.tokenizer.eos_token_id and len(ours) < 8  # finished at EOS before the limit
    assert ours == plain[:len(ours)] and all(t == model.tokenizer.eos_token_id for t in plain[len(ours):])


# ---- the pieces by hand ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_last_layer_probabilities_are_the_eager_attention_of_that_layer_alone(tiny_model_factory, kv_heads):
    """The probe records what output_attentions gives in eager mode (last layer, maximum over heads) for a left-padded
    batch, with grouped-query attention too (SmolLM2), leaves the model's outputs unchanged, switches no other layer,
    and gives the layer its config back."""
    from transformers import DynamicCache

    from minigpt4.common.tiny_models import TINY_LLM
    from minigpt4.models.last_layer_attention import LastLayerAttention

    model = tiny_model_factory("vib", llm=dict(TINY_LLM, num_key_value_heads=kv_heads)).eval()
    llm = model.llm
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        with eager_attention(model):
            eager = llm(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True)
        expected = eager.attentions[-1][:, :, -1].max(dim=1).values
        own_config = llm.get_decoder().layers[-1].self_attn.config
        cache = DynamicCache(config=llm.config)
        with LastLayerAttention(llm) as probe:
            assert llm.config._attn_implementation == "sdpa"
            assert all(layer.self_attn.config is llm.config for layer in llm.get_decoder().layers[:-1])
            llm(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], cache=cache)
            with probe.recording(mask):
                step = llm(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:], cache=cache)
        assert llm.get_decoder().layers[-1].self_attn.config is own_config
        assert torch.allclose(probe.probabilities, expected, atol=1e-6)
        assert float(probe.probabilities[1, :3].abs().max()) == 0.0  # the padding gets nothing
        plain = llm(input_ids=ids, attention_mask=mask, position_ids=positions)
    assert torch.allclose(step.logits[:, -1], plain.logits[:, -1], atol=1e-5)


def test_column_scores_and_the_float16_buffer_by_hand():
    """Π_{i ≥ j} of the scaled response block's column j, times 1e-7, in float16: 0 below its range, inf above."""
    history = torch.tensor([[[0.5, 0.0], [0.25, 0.5]]])
    candidate = torch.tensor([[[0.1, 0.2, 0.4]]])
    # scaled by 10: [[5, 0, 0], [2.5, 5, 0], [1, 2, 4]] -> columns 5·2.5·1, 5·2, 4
    scores = column_scores(history, candidate, 10.0)
    assert scores.dtype == torch.float16
    assert scores.tolist() == (torch.tensor([[[12.5, 10.0, 4.0]]]) * 1e-7).to(torch.float16).tolist()
    huge = column_scores(history, candidate, 1e6)[0, 0].tolist()  # 1e-7·5e5·2.5e5·1e5 = 1.25e9 > 65504
    assert huge == [float("inf"), 1e4, torch.tensor(0.04).half().item()]
    assert column_scores(history, candidate, 0.1)[0, 0].tolist() == [0.0] * 3  # below float16's smallest


def test_a_rollback_steps_scores_by_hand():
    """Raw logits shifted so that each row's minimum is −999, the rejected continuations (beam·V + token) at −999."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    scores = rejection_scores(logits, torch.tensor([1, 5]))  # beam 0 token 1, beam 1 token 2
    assert scores.tolist() == [[-999.0, -999.0, -998.0], [-998.0, -999.0, -999.0]]


def _search(generated: int, **decoding) -> PromptSearch:
    decoding = {"num_beams": 2, "num_attn_candidates": 2, "threshold": 1, **decoding}
    search = PromptSearch(OperaDecoding(**decoding),
                          PromptLayout(length=4, image_start=1, image_end=2), max_new_tokens=64, eos_token_id=2,
                          pad_token_id=0, device=torch.device("cpu"))
    search.running = torch.zeros((2, generated), dtype=torch.long)
    return search


def test_when_the_search_rolls_back_and_where_to():
    search = _search(20)
    search.locations = [torch.tensor([12, 3])] * 3 + [torch.tensor([5, 12])] * 2  # 12: 3 and 2 times per row
    assert search.plan_rollback(12) == (13, 13)  # more than `threshold` (1) times in every row's history
    strict = _search(20, threshold=2)
    strict.locations = search.locations
    assert strict.plan_rollback(12) is None  # row 1 holds it twice, not more than twice
    early = _search(20)
    early.locations = [torch.tensor([9, 9])] * 3
    assert early.plan_rollback(9) is None  # never to a location before the 10th response token
    assert search.plan_rollback(12) == (13, 13)  # the position's 2nd rollback (2 candidates: 2 allowed)
    assert search.plan_rollback(12) == (12, 12)  # the limit is reached: the position before
    assert search.plan_rollback(12) == (12, 12)
    assert search.plan_rollback(12) is None  # both used up
    assert search.rollbacks_at[12:14].tolist() == [2, 2]
    near = _search(20)
    near.locations = [torch.tensor([19, 19])] * 2
    assert near.plan_rollback(19) == (20, 19)  # a location at the end revives one step back, counted at 20


def test_a_rollback_outside_the_window_is_refused_and_changes_nothing():
    """DECISION (minigpt4/models/opera.py): the source would pop its history and fail on an index; here nothing
    happens. Positions from window_size on are never rolled back to (the source's counters end there)."""
    search = _search(40, window_size=16)
    search.locations = [torch.tensor([12, 12])] * 3
    assert search.plan_rollback(12) is None and float(search.rollbacks_at.sum()) == 0
    inside = _search(20, window_size=16)
    inside.locations = [torch.tensor([12, 12])] * 3
    assert inside.plan_rollback(12) == (13, 13)  # iteration 13 is among the last 16 of 20
    beyond = _search(30, window_size=16)
    beyond.locations = [torch.tensor([16, 16])] * 3
    assert beyond.plan_rollback(16) is None  # position 17 ≥ window_size


def test_rejections_after_the_rollback_position_are_forgotten():
    """DECISION: rejects made on the abandoned branch (positions after p) are dropped; those at p accumulate."""
    search = _search(0)
    for g in range(20):  # a history to revive: 20 iterations of two beams
        search.start_iteration()
        search.select(torch.log_softmax(torch.randn(2, 30, generator=torch.Generator().manual_seed(g)), -1))
    search.start_iteration()
    search.rejected = {13: torch.tensor([7]), 18: torch.tensor([8])}
    parents, tokens = search.saved[14].last_choice
    rejected = search.roll_back(13, 13, vocab_size=30)
    assert rejected.tolist() == [7] + (parents * 30 + tokens).tolist()
    assert set(search.rejected) == {13} and search.generated == 13 and set(search.saved) == set(range(14))


def test_a_zero_penalty_weight_is_no_penalty_even_where_a_score_overflows():
    """DECISION: the source's 0 · inf would be NaN; weight 0 leaves the logits as they are. Weight 1: −inf."""
    logits = torch.tensor([[3.0, 1.0]])
    rows = torch.full((1, 2, 4 + 12), 0.5)  # prompt of 4, 11 tokens generated, the candidate
    for weight, expected in ((0.0, [[3.0, 1.0]]), (1.0, [[-float("inf")] * 2])):
        search = _search(11, penalty_weights=weight, scale_factor=1e3)
        search.running = search.running[:1]
        search.attention = torch.full((1, 11, 11), 0.5).tril()
        scores, _ = search.score_candidates(logits, rows)
        assert scores.tolist() == expected
