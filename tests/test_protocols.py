"""Named protocols: the token ids each one feeds a model equal what its source fed Vicuna, checked against an oracle
that calls `sentencepiece` directly, segment by segment, the way the source code tokenized; labels and image lists.

The oracle's texts are written out here from the sources (AdaVIB pope_eval.py / coco_eval.py / minigpt4_module.py,
OPERA chair_eval.py / pope_eval.py / eval_configs, LLaVA conversation.py / mm_utils.py), not imported from
minigpt4/eval/protocols.py, so a wrong character there fails here."""
import io
import json
import os
import re

import pytest
import tomllib
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ADAVIB_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions. Please answer the question. ")
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
QUESTIONS = ["Is there a dog in the image?", "Is there a traffic light in the image?",
             "Is there a Hair Drier (2) here?"]
CORPUS = [ADAVIB_SYSTEM, VICUNA_V1_SYSTEM, LLAVA_V1_SYSTEM, *QUESTIONS,
          "###Human: <Img><ImageHere></Img> Describe this image.###Assistant: a dog runs on the grass###",
          "USER: <image>\nIs there a cat?\nAnswer the question using a single word or phrase. ASSISTANT: No",
          "Please describe this image in detail. The image shows 2 cats and 13 dogs on a sofa in 2014.",
          "is there a snowboard in the image? no, there is not. yes there is. a man rides a bike; café 東京"] * 30


@pytest.fixture(scope="module")
def vicuna_like_dir(tmp_path_factory):
    """A LLaMA-style SentencePiece model trained offline, in a folder laid out like a Vicuna one."""
    sentencepiece = pytest.importorskip("sentencepiece")
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, model_type="bpe", vocab_size=700, byte_fallback=True,
        add_dummy_prefix=True, split_digits=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, allow_whitespace_only_pieces=True, hard_vocab_limit=False,
        minloglevel=2)
    folder = tmp_path_factory.mktemp("vicuna_like")
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "pad_token": None, "legacy": False}))
    return str(folder)


@pytest.fixture(scope="module")
def oracle(vicuna_like_dir):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(vicuna_like_dir, "tokenizer.model"))

    def ids(segments, bos):
        out = [1] if bos else []
        for segment in segments:
            out += sp.encode(segment)
        return out

    ids.sp = sp
    return ids


def _shown(name, arch, tokenizer_dir, question=None):
    from minigpt4.eval.protocols import describe_ids, get_protocol

    return describe_ids(get_protocol(name), arch, tokenizer_dir, question)


def lavis_pre_caption(caption, max_words=50):
    """LAVIS BlipCaptionProcessor.pre_caption (AdaVIB's blip_caption text processor)."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


# (protocol, arch, question -> (segments before the image, segments after it)) as each source tokenized them.
POPE_CASES = [
    ("adavib-pope", "minigpt4",  # pope_eval.py get_context_embeds + PopeEvalDataset: blip_caption, question alone
     lambda q: ([ADAVIB_SYSTEM + "###Human: <Img>"], ["</Img> ", lavis_pre_caption(q), "###Assistant:"])),
    ("opera-pope", "minigpt4",  # INSTRUCTION_TEMPLATE["minigpt4"], prompt_wrap, no system text
     lambda q: (["###Human: <Img>"], ["</Img> " + q + " ###Assistant:"])),
    ("opera-pope", "llava15",  # system_message + INSTRUCTION_TEMPLATE["llava-1.5"], no space in between
     lambda q: ([VICUNA_V1_SYSTEM + "USER: "], [" " + q + " ASSISTANT:"])),
    ("llava15-pope", "llava15",  # conv_vicuna_v1 + tokenizer_image_token
     lambda q: ([VICUNA_V1_SYSTEM + " USER: "],
                ["\n" + q + "\nAnswer the question using a single word or phrase. ASSISTANT:"])),
    ("single-string-pope", "minigpt4",
     lambda q: ([ADAVIB_SYSTEM + "###Human: <Img>"], ["</Img> " + q + "###Assistant:"])),
    ("single-string-pope", "llava15", lambda q: ([LLAVA_V1_SYSTEM + " USER: "], ["\n" + q + " ASSISTANT:"])),
]
CHAIR_CASES = [
    ("adavib-chair", "minigpt4",  # coco_eval.py PROMPT split at <ImageHere>, BOS on the first segment
     [ADAVIB_SYSTEM + "###Human: <Img>"], ["</Img> Describe this image.###Assistant:"]),
    ("opera-chair-500", "minigpt4", ["###Human: <Img>"],
     ["</Img> Please describe this image in detail. ###Assistant:"]),
    ("opera-chair-500", "llava15", [VICUNA_V1_SYSTEM + "USER: "],
     [" Please describe this image in detail. ASSISTANT:"]),
    ("opera-chair-500-beam5", "llava15", [VICUNA_V1_SYSTEM + "USER: "],
     [" Please describe this image in detail. ASSISTANT:"]),
    ("opera-chair-500-64tok", "minigpt4", ["###Human: <Img>"],
     ["</Img> Please describe this image in detail. ###Assistant:"]),
]


@pytest.mark.parametrize("name,arch,segments", POPE_CASES, ids=[f"{c[0]}-{c[1]}" for c in POPE_CASES])
def test_pope_protocol_ids_equal_the_sentencepiece_oracle(name, arch, segments, vicuna_like_dir, oracle):
    for question in QUESTIONS:
        shown = _shown(name, arch, vicuna_like_dir, question)
        before, after = segments(question)
        assert shown["tokenizer"] == "sentencepiece"
        assert shown["before_image"] == oracle(before, bos=True), (name, question)
        assert shown["after_image"] == oracle(after, bos=False), (name, question)
        assert shown["prompt_text"] == "".join(before) + "<ImageHere>" + "".join(after)


@pytest.mark.parametrize("name,arch,before,after", CHAIR_CASES, ids=[f"{c[0]}-{c[1]}" for c in CHAIR_CASES])
def test_chair_protocol_ids_equal_the_sentencepiece_oracle(name, arch, before, after, vicuna_like_dir, oracle):
    shown = _shown(name, arch, vicuna_like_dir)
    assert shown["before_image"] == oracle(before, bos=True)
    assert shown["after_image"] == oracle(after, bos=False)


def test_transformers_alone_would_drop_a_token_the_sources_fed(vicuna_like_dir, oracle):
    """Why the ids come from sentencepiece: transformers 5's Llama tokenizer gives no dummy prefix to a segment
    that starts with a space, e.g. OPERA's LLaVA text after the image."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(vicuna_like_dir, local_files_only=True)
    text = " Please describe this image in detail. ASSISTANT:"
    assert hf(text, add_special_tokens=False).input_ids != oracle([text], bos=False)
    assert _shown("opera-chair-500", "llava15", vicuna_like_dir)["after_image"] == oracle([text], bos=False)


def test_special_tokens_written_in_text_become_their_ids(vicuna_like_dir, oracle):
    from minigpt4.models.from_config import load_tokenizer
    from minigpt4.models.tokenization import SegmentTokenizer

    encoder = SegmentTokenizer(load_tokenizer(vicuna_like_dir))
    assert encoder.encode("a dog</s>") == oracle.sp.encode("a dog") + [2]  # the Llama-2 template's end string
    assert encoder.encode("") == []


def test_cli_prints_one_protocol_as_json(vicuna_like_dir, oracle, capsys):
    from minigpt4.eval import protocols

    assert protocols.main(["adavib-pope", "--tokenizer", vicuna_like_dir, "--question", QUESTIONS[0]]) == 0
    shown = json.loads(capsys.readouterr().out)
    for key in ("name", "source", "max_new_tokens", "num_beams", "answer_rule", "prompt_text", "before_image",
                "after_image"):
        assert key in shown
    assert (shown["max_new_tokens"], shown["num_beams"], shown["answer_rule"]) == (10, 1, "reference")
    assert "jiaqi5598/AdaVIB" in shown["source"] and "pope_eval.py" in shown["source"]
    assert protocols.main([]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in protocols.PROTOCOLS)
    assert protocols.main(["no-such-protocol", "--tokenizer", vicuna_like_dir]) == 2
    assert "unknown protocol" in capsys.readouterr().err
    assert protocols.main(["llava15-pope", "--tokenizer", vicuna_like_dir, "--arch", "minigpt4"]) == 2
    assert "no prompt for minigpt4" in capsys.readouterr().err


def test_llava15_prompt_is_llavas_vicuna_v1_conversation(vicuna_like_dir, oracle):
    """LLaVA's conv_vicuna_v1.get_prompt() (SeparatorStyle.TWO, sep ' ', roles USER/ASSISTANT) for one question,
    written out, and tokenizer_image_token's ids: chunks split at '<image>', each with BOS, BOS kept on the first."""
    system, sep, roles = VICUNA_V1_SYSTEM, " ", ("USER", "ASSISTANT")
    question = QUESTIONS[1] + "\nAnswer the question using a single word or phrase."
    llava_prompt = system + sep + roles[0] + ": " + "<image>\n" + question + sep + roles[1] + ":"
    shown = _shown("llava15-pope", "llava15", vicuna_like_dir, QUESTIONS[1])
    assert shown["prompt_text"].replace("<ImageHere>", "<image>") == llava_prompt
    chunks = [[1] + oracle.sp.encode(chunk) for chunk in llava_prompt.split("<image>")]
    assert shown["before_image"] == chunks[0] and shown["after_image"] == chunks[1][1:]


def test_adavib_training_sequence_and_label_mask(vicuna_like_dir, oracle):
    """minigpt4_module.py _step: [BOS] + prompt_wrap('###Human: <Img><ImageHere></Img> ') (each side tokenized
    without BOS) + tokenizer(caption + '###', add_special_tokens=False); labels -100 up to the caption."""
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.models.from_config import build_model

    model = build_model(tiny_model_config(vicuna_like_dir, "vib", prompt_template="vicuna_v0", end_sym="###"))
    caption = "a man rides a bike 2 cats and 13 dogs on a sofa"  # already through blip_caption, as the dataset does
    text = model.build_training_text([None], [caption])
    n = model.num_query_tokens
    before, after = oracle(["###Human: <Img>"], bos=True), oracle(["</Img> "], bos=False)
    target = oracle([caption + "###"], bos=False)
    row = text.input_ids[0].tolist()
    assert row[: len(before)] == before
    assert text.image_mask[0].tolist() == [False] * len(before) + [True] * n + [False] * (len(after) + len(target))
    assert row[len(before) + n:] == after + target
    assert text.labels[0].tolist() == [-100] * (len(before) + n + len(after)) + target


def test_model_generation_prompt_uses_the_protocol_segments(vicuna_like_dir, oracle):
    from minigpt4.common.tiny_models import tiny_model_config
    from minigpt4.eval.protocol_runs import resolve_run
    from minigpt4.eval.settings import EvalSettings
    from minigpt4.models.from_config import build_model

    model = build_model(tiny_model_config(vicuna_like_dir, "linear"))
    ev = EvalSettings(tasks=["pope"])
    ev.pope.protocol = "adavib-pope"
    prompt = resolve_run(ev, "pope", "vicuna_v0").pope_prompt(QUESTIONS[0])
    batch = model.build_generation_text([prompt])
    expected = (oracle([ADAVIB_SYSTEM + "###Human: <Img>"], bos=True)
                + [model.tokenizer.pad_token_id] * model.num_query_tokens
                + oracle(["</Img> ", "is there a dog in the image?", "###Assistant:"], bos=False))
    assert batch.input_ids[0].tolist() == expected
    with torch.no_grad():
        answers = model.generate([prompt], torch.zeros(1, 3, 28, 28), max_new_tokens=2, min_new_tokens=1,
                                 stop_strings=[])
    assert len(answers) == 1


def _settings(task, protocol, **keys):
    from minigpt4.eval.settings import EvalSettings

    ev = EvalSettings(tasks=[task])
    sub = getattr(ev, task)
    sub.protocol = protocol
    for key, value in keys.items():
        target, name = (sub, key) if hasattr(sub, key) else (ev, key)
        setattr(target, name, value)
    return ev


def test_a_key_on_top_of_a_protocol_is_labelled_name_plus_overrides():
    from minigpt4.eval.protocol_runs import resolve_run

    plain = resolve_run(_settings("pope", "adavib-pope", max_new_tokens=10), "pope", "vicuna_v0")
    assert plain.label == "adavib-pope" and plain.overrides == {}  # the protocol's own value is no override
    run = resolve_run(_settings("pope", "adavib-pope", max_new_tokens=3, num_beams=2), "pope", "vicuna_v0")
    assert run.label == "adavib-pope+overrides"
    assert run.overrides == {"eval.pope.max_new_tokens": {"protocol": 10, "used": 3},
                             "eval.num_beams": {"protocol": 1, "used": 2}}
    assert run.generate_kwargs()["max_new_tokens"] == 3 and run.summary()["overrides"] == run.overrides
    chair = resolve_run(_settings("chair", "opera-chair-500", sentences="drop-unk"), "chair", "llava15")
    assert chair.label == "opera-chair-500+overrides" and "eval.chair.sentences" in chair.overrides
    assert chair.caption_for_scoring("An elephant with a trunk. A dog") == " A dog"


def test_protocol_errors_name_the_key():
    from minigpt4.common.config import ConfigError
    from minigpt4.eval.protocol_runs import resolve_run

    with pytest.raises(ConfigError, match="eval.pope.protocol: unknown protocol"):
        resolve_run(_settings("pope", "opera-500img-512tok"), "pope", "vicuna_v0")
    with pytest.raises(ConfigError, match="eval.pope.protocol: protocol opera-chair-500 is a chair protocol"):
        resolve_run(_settings("pope", "opera-chair-500"), "pope", "vicuna_v0")
    with pytest.raises(ConfigError, match="eval.chair.images: protocol adavib-chair runs on a list"):
        resolve_run(_settings("chair", "adavib-chair"), "chair", "vicuna_v0")
    with pytest.raises(ConfigError, match="no prompt for model.prompt_template = 'llama2'"):
        resolve_run(_settings("pope", "adavib-pope"), "pope", "llama2")
    with pytest.raises(ConfigError, match="eval.pope.rule"):
        resolve_run(_settings("pope", "adavib-pope", rule="majority"), "pope", "vicuna_v0")


def test_opera_image_list_ships_with_the_package():
    from minigpt4.eval.protocols import OPERA_500_FILE, shipped_image_list

    path = shipped_image_list()
    assert os.path.dirname(path).endswith(os.path.join("minigpt4", "eval", "data", "chair"))
    ids = open(path).read().split()
    assert len(ids) == 500 == len(set(ids)) and all(i.isdigit() for i in ids)
    shared = os.path.join(ROOT, "..", "shared", "data", "chair", OPERA_500_FILE)
    if os.path.exists(shared):
        assert open(shared).read().split() == ids
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["minigpt4.eval"]
    assert "data/chair/*.txt" in package_data


def test_opera_images_come_from_the_package_and_a_missing_one_is_named(tmp_path):
    from minigpt4.common.jsonfiles import DataFileError
    from minigpt4.eval.benchmark_runs import CHAIR_CAPTIONS, planned_items
    from minigpt4.eval.protocol_runs import protocol_runs
    from minigpt4.eval.protocols import shipped_image_list

    ids = open(shipped_image_list()).read().split()
    images = tmp_path / "val2014"
    images.mkdir()
    for image_id in ids[1:]:  # the first of OPERA's 500 is not there
        (images / f"COCO_val2014_{int(image_id):012d}.jpg").touch()
    ev = _settings("chair", "opera-chair-500")
    ev.image_dir = str(images)
    with pytest.raises(DataFileError) as err:
        planned_items(ev, protocol_runs(ev, "vicuna_v0"))
    message = str(err.value)
    assert f"COCO_val2014_{int(ids[0]):012d}.jpg" in message and "1 image(s)" in message
    assert "eval.chair.protocol = opera-chair-500" in message
    (images / f"COCO_val2014_{int(ids[0]):012d}.jpg").touch()
    items = planned_items(ev, protocol_runs(ev, "vicuna_v0"))[CHAIR_CAPTIONS]
    assert [item.key for item in items] == [str(int(i)) for i in ids]  # all 500, in OPERA's order
    assert items[0].prompt == "###Human: <Img><ImageHere></Img> Please describe this image in detail. ###Assistant:"


def test_records_carry_their_sources_generation_settings():
    from minigpt4.conversation.templates import get_template
    from minigpt4.eval.protocol_runs import resolve_run
    from minigpt4.eval.protocols import FAMILIES, IMAGE_SETS, PROTOCOLS, build_prompt

    for protocol in PROTOCOLS.values():
        assert protocol.source and protocol.description and protocol.prompts, protocol.name
        assert protocol.image_set in IMAGE_SETS and set(protocol.families) <= set(FAMILIES), protocol.name
        assert (protocol.answer_rule is not None) == (protocol.task == "pope"), protocol.name
    beam = resolve_run(_settings("chair", "opera-chair-500-beam5"), "chair", "llava15").generate_kwargs()
    assert beam == dict(max_new_tokens=512, num_beams=5, min_new_tokens=0, stop_strings=[])  # to EOS, as OPERA
    llava = resolve_run(_settings("pope", "llava15-pope"), "pope", "llava15")
    assert llava.generate_kwargs()["max_new_tokens"] == 128 and llava.used.answer_rule == "first-sentence"
    opera = resolve_run(_settings("chair", "opera-chair-500"), "chair", "vicuna_v0")
    assert opera.generate_kwargs()["min_new_tokens"] == 1  # MiniGPT-4's generate(min_length=1)
    assert opera.clean_answer("A dog.###Human: x") == "A dog." and opera.clean_answer("Assistant: A cat") == "A cat"
    template = get_template("vicuna_v0")  # the shapes model was trained on exactly this prompt, no system text
    for name in ("shapes-pope", "shapes-chair"):
        assert build_prompt(PROTOCOLS[name].prompt_for("minigpt4"), "Is there a cube?") == template.prompt(
            "Is there a cube?")
