"""Hostile captions: empty or punctuation-only captions (caption JSON and webdataset shards, on_bad_image error
and skip) and captions longer than max_txt_len."""
from __future__ import annotations

import io
import json
import tarfile
from functools import partial

from _hostile import GOOD_RGB, TEXT_PROC, TRAIN_PROC, Case, Counted, Env, Holds, Raises, write_file

from minigpt4.datasets.caption import CaptionJsonDataset
from minigpt4.datasets.webdata import BadSampleError, WebCaptionDataset
from minigpt4.processors import build_image_processor, build_text_processor


def empty_caption(caption: str, on_bad_image: str, env: Env) -> int:
    images = env.tmp / "images"
    images.mkdir()
    for i in (1, 2):
        (images / f"{i:012d}.jpg").write_bytes(GOOD_RGB)
    ann = write_file(env, "captions.json", json.dumps([{"image_id": 1, "caption": "a brown square"},
                                                    {"image_id": 2, "caption": caption}]))
    dataset = CaptionJsonDataset(ann, images, build_image_processor(TRAIN_PROC), build_text_processor(TEXT_PROC),
                                 on_bad_image=on_bad_image)
    assert len(dataset) == 1 and dataset[0]["id"] == "1" and dataset.empty_captions == ["2"]
    return len(dataset.empty_captions)


def _shard(env: Env, captions: dict[str, str]) -> str:
    path = env.tmp / "shard-0.tar"
    with tarfile.open(path, "w") as tar:
        for key, caption in captions.items():
            for name, data in ((f"{key}.jpg", GOOD_RGB), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def empty_caption_in_shard(on_bad_image: str, env: Env) -> int:
    shard = _shard(env, {"k1": "a brown square", "k2": "  ..  "})
    dataset = WebCaptionDataset(shard, build_image_processor(TRAIN_PROC), build_text_processor(TEXT_PROC),
                                repeat=False, shuffle_buffer=0, on_bad_image=on_bad_image)
    samples = list(dataset)
    assert [s["id"] for s in samples] == ["k1"]
    return dataset.num_skipped


def long_caption(env: Env) -> bool:
    model = env.shared.model("vib")
    end_ids = model._ids(model.end_sym)
    long, short = "a red circle next to a blue square " * 40, "a red circle"
    text = model.build_training_text([None, None], [long, short])
    labels = [row[row != -100].tolist() for row in text.labels]
    assert len(labels[0]) == model.max_txt_len  # cut to max_txt_len tokens, as MiniGPT-4 does ...
    assert labels[0][-len(end_ids):] != end_ids  # ... the end symbol with it
    assert labels[1] == model._ids(short + model.end_sym) and labels[1][-len(end_ids):] == end_ids
    return True


CAPTION_CASES = [
    Case("caption/empty/error", partial(empty_caption, "", "error"),
         Raises(ValueError, ("{tmp}/captions.json: entry 1 (image_id 2) has an empty caption after cleaning ('')",
                             "on_bad_image: skip"))),
    Case("caption/only-punctuation/error", partial(empty_caption, " ... !\n", "error"),
         Raises(ValueError, ("captions.json: entry 1 (image_id 2) has an empty caption", "' ... !\\n'"))),
    Case("caption/empty/skip", partial(empty_caption, "", "skip"), Counted(1)),
    Case("caption/empty/webdataset-skip", partial(empty_caption_in_shard, "skip"), Counted(1)),
    Case("caption/empty/webdataset-error", partial(empty_caption_in_shard, "error"),
         Raises(BadSampleError, ("{tmp}/shard-0.tar:k2: empty caption after cleaning",))),
    Case("caption/longer-than-max_txt_len", long_caption, Holds("labels cut to max_txt_len, end symbol cut too")),
]
