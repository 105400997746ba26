"""The inputs and timed workloads of scripts/benchmark.py: training steps, the data loader, POPE and CHAIR
generation (each with the straightforward path it is compared against), and the training profiler."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from minigpt4.benchmarking.measure import PeakMemory, autocast, sync
from minigpt4.models.minigpt4 import TextBatch

WORDS = ("a photo of dog on the grass next to red ball two cats sleeping sofa in living room man riding bike down "
         "busy street with cars and bus plate fork knife hot woman holding an umbrella rain kitchen stove sink "
         "refrigerator airplane flying blue sky over city giraffe zebra standing near tree circle small square "
         "green star").split()
POPE_OBJECTS = ("dog", "traffic light", "chair", "baseball glove", "cup", "hair drier", "cell phone", "tie")


# --------------------------------------------------------------------------------------------- inputs
def write_images(folder: Path, count: int, *, width: int = 640, height: int = 480, seed: int = 0) -> list[str]:
    """COCO-sized random JPEGs (the loader's decode cost is part of what is measured)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(1, count + 1):
        path = folder / f"{i:012d}.jpg"
        if not path.exists():
            small = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)  # smooth-ish, JPEG-like
            Image.fromarray(small).resize((width, height), Image.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    return paths


def caption(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def training_batches(model, count: int, batch_size: int, image_size: int, device: torch.device, seed: int = 0):
    """Pre-built micro-batches (pixels on the device, captions of 20-50 words as in the AdaVIB recipe)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        answers = [caption(rng, 20, 50) for _ in range(batch_size)]
        text = model.build_training_text([None] * batch_size, answers)
        batches.append({"image": torch.randn(batch_size, 3, image_size, image_size, generator=gen).to(device),
                        "answer": answers, "llm_tokens": int(text.attention_mask.sum()) * model.vib.num_samples})
    return batches


def pad_right(text: TextBatch, width: int, pad_id: int) -> TextBatch:
    extra = width - text.input_ids.shape[1]
    if extra <= 0:
        return text
    pad = lambda t, value: torch.nn.functional.pad(t, (0, extra), value=value)  # noqa: E731
    return TextBatch(pad(text.input_ids, pad_id), pad(text.image_mask, False), pad(text.attention_mask, 0),
                     pad(text.labels, -100))


def reference_forward(model, batch: dict, *, encoder_passes: int = 1, pad_to: int | None = None) -> torch.Tensor:
    """MiniGPT4.forward spelt out from its public pieces, with the straightforward choices the model avoids:
    the encoder run once per noise sample (encoder_passes = S) and every batch padded to a fixed width."""
    images, samples = batch["image"], model.vib.num_samples
    if encoder_passes == 1:
        tokens, info = model.project(model.encode_images(images), num_samples=samples)
        kl_terms = [info.get("kl_term")]
    else:  # one sample per pass: S × (ViT + Q-Former + projector)
        parts = [model.project(model.encode_images(images), num_samples=1) for _ in range(encoder_passes)]
        tokens, kl_terms = torch.cat([t for t, _ in parts]), [i.get("kl_term") for _, i in parts]
    text = model.build_training_text([None] * images.shape[0], batch["answer"])
    if pad_to is not None:
        text = pad_right(text, pad_to, model.tokenizer.pad_token_id)
    text = text.to(model.device).repeat(tokens.shape[0] // images.shape[0])
    out = model.llm(inputs_embeds=model.embed(text, tokens), attention_mask=text.attention_mask, labels=text.labels)
    kl = [k.to(out.loss.device) for k in kl_terms if k is not None]
    return out.loss.float() + (sum(kl) / len(kl) if kl else 0.0)


# --------------------------------------------------------------------------------------------- training
def time_training(model, batches: list[dict], loss_fn: Callable, *, steps: int, warmup: int, accum: int,
                  device: torch.device, amp: bool) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-7)
    model.train()
    images = tokens = 0
    memory = PeakMemory(device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            memory.__enter__()
            start = time.perf_counter()
        batch = batches[i % len(batches)]
        with autocast(device, amp):
            loss = loss_fn(model, batch)
        (loss / accum).backward()
        if (i + 1) % accum == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            images, tokens = images + len(batch["answer"]), tokens + batch["llm_tokens"]
    sync(device)
    elapsed = time.perf_counter() - start
    memory.__exit__()
    optimizer.zero_grad(set_to_none=True)
    return {"samples_per_s": images / elapsed, "tokens_per_s": tokens / elapsed, "step_ms": 1e3 * elapsed / steps,
            "steps": steps, **memory.result()}


def model_loss(model, batch: dict) -> torch.Tensor:
    return model(batch)["loss"]


def check_reference(model, batches: list[dict], device: torch.device, pad_to: int) -> None:
    """The baselines differ from the model only in the optimization: same loss with the same noise."""
    model.train()
    for kwargs in ({}, {"pad_to": pad_to}):
        torch.manual_seed(1)
        ours = model(batches[0])["loss"].detach()
        torch.manual_seed(1)
        ref = reference_forward(model, batches[0], **kwargs).detach()
        tol = 1e-4 if device.type == "cpu" else 2e-2
        if not torch.allclose(ours.float(), ref.float(), rtol=tol, atol=tol):
            raise AssertionError(f"reference path {kwargs or '(plain)'} disagrees with MiniGPT4.forward: "
                                 f"{float(ref)} vs {float(ours)}")


def loader_throughput(folder: Path, paths: list[str], image_size: int, batch_size: int, workers: int,
                      pin_memory: bool) -> dict[str, Any]:
    from minigpt4.datasets.builders import build_train_dataset
    from minigpt4.runners.data_order import EpochSlice, epoch_micro_batches

    ann = folder / "captions.json"
    rng = random.Random(0)
    ann.write_text(json.dumps([{"image_id": int(Path(p).stem), "caption": caption(rng, 20, 50)} for p in paths]))
    dataset, collate = build_train_dataset({"caption_json": {
        "ann_path": str(ann), "image_dir": str(Path(paths[0]).parent),
        "vis_processor": {"name": "blip2_image_train", "image_size": image_size},
        "text_processor": {"name": "blip_caption", "max_words": 50}}})
    batches = len(paths) // batch_size
    start = time.perf_counter()
    count = 0
    part = EpochSlice(batch_size=batch_size, rank=0, world_size=1, seed=0, epoch=0, num_batches=batches)
    for batch in epoch_micro_batches(dataset, collate, part, num_workers=workers, pin_memory=pin_memory):
        count += batch["image"].shape[0]
    elapsed = time.perf_counter() - start
    return {"samples_per_s": count / elapsed, "num_workers": workers, "pin_memory": pin_memory}


# ------------------------------------------------------------------------------------------- evaluation
def pope_items(paths: list[str], per_image: int):
    from minigpt4.conversation.templates import format_eval_prompt
    from minigpt4.eval.generate import GenerationItem
    from minigpt4.eval.settings import REFERENCE_PROMPT, REFERENCE_SYSTEM

    items = []
    for i, path in enumerate(paths):
        for j in range(per_image):
            question = f"Is there a {POPE_OBJECTS[(i + j) % len(POPE_OBJECTS)]} in the image?"
            items.append(GenerationItem(key=f"{i}-{j}", image=path,
                                        prompt=format_eval_prompt(REFERENCE_PROMPT, system=REFERENCE_SYSTEM,
                                                                  question=question)))
    random.Random(0).shuffle(items)  # POPE files interleave prompt lengths; sorting has something to do
    return items


def chair_items(paths: list[str]):
    from minigpt4.conversation.templates import format_eval_prompt
    from minigpt4.eval.generate import GenerationItem
    from minigpt4.eval.settings import REFERENCE_PROMPT, REFERENCE_SYSTEM

    prompt = format_eval_prompt(REFERENCE_PROMPT, system=REFERENCE_SYSTEM, question="Describe this image.")
    return [GenerationItem(key=str(i), image=p, prompt=prompt) for i, p in enumerate(paths)]


def quiet_progress_bars() -> None:
    """generate_all draws a tqdm bar per run; in a benchmark table they only interleave with the output."""
    from tqdm import tqdm

    from minigpt4.eval import generate

    generate.tqdm = lambda *args, **kwargs: tqdm(*args, **{**kwargs, "disable": True})


def time_generation(model, items, workdir: Path, name: str, *, image_size: int, batch_size: int,
                    max_new_tokens: int, sort: bool = True, use_cache: bool = True,
                    feature_cache: str | None = None, vis_processor: str = "blip2_image_eval",
                    generate_kwargs: dict | None = None,
                    decoding=None) -> tuple[dict[str, str], dict[str, Any]]:
    """One run of the real evaluation path (task_runs.GenerationInputs + generate.generate_all) over `items`;
    `generate_kwargs` go to the generate that answers (decodings.generate_answers) besides max_new_tokens;
    `decoding`: None (the model's own generate), a ContrastiveDecoding (VCD) or an OperaDecoding (OPERA)."""
    from minigpt4.eval.generate import generate_all
    from minigpt4.eval.settings import EvalSettings
    from minigpt4.eval.task_runs import GenerationInputs

    settings = EvalSettings(image_dir=str(Path(items[0].image).parent), batch_size=batch_size, sort_by_length=sort,
                            use_cache=use_cache, feature_cache=feature_cache,
                            vis_processor={"name": vis_processor, "image_size": image_size})
    out_path = workdir / f"{name}.jsonl"
    out_path.unlink(missing_ok=True)  # generate_all resumes: a leftover file would skip the work
    try:
        # As in a new evaluation process: with a feature cache, GenerationInputs fingerprints the encoder weights
        # (setup_s, not timed: once per run, whatever the number of questions) and starts with nothing in memory.
        setup_start = time.perf_counter()
        inputs = GenerationInputs(model, settings, decoding)
        setup_s = time.perf_counter() - setup_start
        sync(model.device)
        start = time.perf_counter()
        inputs.prepare(items)
        preds = generate_all(model, items, out_path=str(out_path), load_image=inputs.load_image,
                             image_features=inputs.image_features, decoding=decoding,
                             batch_size=batch_size, sort_by_length=sort,
                             generate_kwargs=dict(max_new_tokens=max_new_tokens, **(generate_kwargs or {})),
                             desc=name)
        sync(model.device)
        seconds = time.perf_counter() - start
    finally:
        model.llm.generation_config.use_cache = True
    answers = {k: v["answer"] for k, v in preds.items()}
    return answers, {"items_per_s": len(items) / seconds, "seconds": seconds, "items": len(items), "setup_s": setup_s}


# ------------------------------------------------------------------------------------------------ profile
def profile_training(model, batches: list[dict], steps: int, device: torch.device, amp: bool, path: Path) -> list:
    """torch.profiler over a few optimized training steps: the table goes to `path`, the top ops to the JSON."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    model.train()
    with profile(activities=activities) as prof:
        for i in range(steps):
            with autocast(device, amp):
                loss = model_loss(model, batches[i % len(batches)])
            loss.backward()
        sync(device)
    model.zero_grad(set_to_none=True)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=attr, row_limit=30)
    path.write_text(f"torch.profiler, {steps} training steps (forward + backward), sorted by {attr}\n\n{table}\n")
    total = sum(getattr(e, attr, 0.0) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, attr, 0.0), reverse=True)[:12]
    return [{"op": e.key, "self_ms": getattr(e, attr, 0.0) / 1e3, "share": getattr(e, attr, 0.0) / total,
             "calls": e.count} for e in top]
