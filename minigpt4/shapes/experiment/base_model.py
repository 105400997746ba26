"""The stage-0 shapes-world base model (scripts/train_shapes_base.py writes assets/shapes_base): a tiny MiniGPT-4
trained from scratch, end to end, on captions mixed with POPE-style object questions (minigpt4.shapes.world.qa),
plus an object-presence loss through a linear probe that is thrown away afterwards.

Its training world (TRAIN_WORLD) has the evaluation world's generator parameters but seed 1 and 15000 training
images; its val split is the dev set checked during training (quick_val).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from minigpt4.common.tiny_models import train_tokenizer
from minigpt4.conversation.templates import IMAGE_PLACEHOLDER, get_template
from minigpt4.models.checkpoints import save_state_file
from minigpt4.models.from_config import build_model
from minigpt4.runners.schedules import linear_warmup_cosine
from minigpt4.shapes.world.qa import (
    CAPTION_INSTRUCTION,
    ShapesQADataset,
    collate,
    no_answer,
    object_question,
    yes_answer,
)
from minigpt4.shapes.world.scenes import CLASS_NAMES, build_shapes_world

ROOT = Path(__file__).resolve().parents[3]  # the checkout: model.yaml's paths are relative to it when inside

# The evaluation world (`scripts/make_shapes_world.py` defaults) and the training world: same generator
# parameters, another seed, five times the training images.
EVAL_WORLD = dict(num_train=3000, num_val=300, seed=0, image_size=64, cooccurrence=0.9, captions_per_image=3)
TRAIN_WORLD = dict(EVAL_WORLD, num_train=15000, seed=1)
IMAGE_SIZE = EVAL_WORLD["image_size"]
TOKENIZER_VOCAB = 600  # more than the training text needs: every word ends up a single token
WIDTH = 128

# The `model:` config section, minus the two paths (filled in by `model_config`). Patch 8 on 64 px gives 64
# patches. No dropout anywhere: MiniGPT4.train() keeps the encoder and the LLM in eval mode anyway.
MODEL = dict(
    arch="minigpt4",
    vision=dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=3, num_attention_heads=4,
                image_size=IMAGE_SIZE, patch_size=8,
                # Blip2VisionConfig's default init std is 1e-10 (BLIP-2 always loads weights): from scratch
                # that is an all-but-zero ViT that trains only after a long plateau. 0.05 (about PyTorch's
                # default Linear init at this width) learns clearly faster than BERT's 0.02.
                initializer_range=0.05),
    qformer=dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4,
                 cross_attention_frequency=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                 initializer_range=0.05),
    llm=dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256),
    num_query_tokens=8,
    mm_projector_type="linear",
    prompt_template="vicuna_v0",
    llm_dtype="fp32",
    encoder_dtype="fp32",
    max_txt_len=64,
)


def model_config(tokenizer_path: str, full_ckpt: str | None = None) -> dict:
    return {**MODEL, "tokenizer_path": tokenizer_path, "full_ckpt": full_ckpt}


class ObjectProbe(torch.nn.Module):
    """Training-only helper: which classes are in the image, read linearly from the Q-Former outputs.

    A ViT learns from scratch slowly when its only signal is the caption loss back-propagated through the
    LLM; this direct object-presence loss (BCE) gets it going, the way the real encoder arrives already
    pre-trained. Max over the query tokens: any one query may carry an object. Not saved with the model.
    """

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features).amax(dim=1)


def tokenizer_corpus(dataset: ShapesQADataset) -> list[str]:
    """Every text the model reads or writes in training: captions, prompts, questions and answers."""
    template = get_template(MODEL["prompt_template"])
    prompts = [template.prompt(q).replace(IMAGE_PLACEHOLDER, " ") + template.end_sym
               for q in [CAPTION_INSTRUCTION, *map(object_question, CLASS_NAMES)]]
    answers = [a for name in CLASS_NAMES for a in (yes_answer(name), no_answer(name))]
    return [c for captions in dataset.captions for c in captions] + prompts + answers


def repo_relative(path: Path) -> str:
    """Paths in model.yaml are relative to the repository root when they lie inside it (commands run there)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


@torch.no_grad()
def quick_val(model, data_dir: Path, n_images: int) -> dict:
    """Caption the first n val images of the training world and score them with the real CHAIR scorer (a
    dev check only; the reported metrics come from `evaluate.py --cfg-path eval_configs/shapes_base.yaml`)."""
    from minigpt4.eval.chair import CHAIRScorer, build_ground_truth, score_captions

    val = ShapesQADataset(data_dir, "val", image_size=IMAGE_SIZE)
    template = get_template(MODEL["prompt_template"])
    prompt = template.prompt(CAPTION_INSTRUCTION)
    model.eval()
    rows = []
    for start in range(0, min(n_images, len(val)), 50):
        stop = min(start + 50, n_images, len(val))
        answers = model.generate([prompt] * (stop - start), val.images(range(start, stop)), max_new_tokens=48)
        rows += [{"image_id": val.image_ids[i], "caption": a} for i, a in zip(range(start, stop), answers, strict=True)]
    scorer = CHAIRScorer(data_dir / "synonyms.txt")
    gt = build_ground_truth(data_dir / "annotations", scorer=scorer)
    result = score_captions(rows, gt, scorer=scorer)
    model.train()
    return {k: result[k] for k in ("chair_s", "chair_i", "recall", "mean_length")} | {
        "examples": [r["caption"] for r in rows[:3]]}


def ensure_training_world(data_dir: Path) -> None:
    """Generate TRAIN_WORLD into data_dir if it has none; refuse a world made with other parameters."""
    if not (data_dir / "meta.json").is_file():
        print(f"generating the shapes world into {data_dir}", flush=True)
        build_shapes_world(data_dir, **TRAIN_WORLD)
    meta = json.loads((data_dir / "meta.json").read_text(encoding="utf-8"))["params"]
    differing = {k: (meta.get(k), v) for k, v in TRAIN_WORLD.items() if meta.get(k) != v}
    if differing:
        raise SystemExit(f"{data_dir}/meta.json: this world differs from the base model's "
                         f"(key: (found, expected)): {differing}; regenerate it or pass another --data")


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    # Weight decay on matrices only: not on norms, biases, or the ViT's patch/position/class embeddings.
    decay = [p for n, p in named if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in named if not (p.dim() >= 2 and "embedding" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def train_step(model, probe: ObjectProbe, optimizer: torch.optim.Optimizer, batch: dict,
               flips: torch.Generator, probe_weight: float) -> tuple[float, float]:
    """One optimizer step on the caption/answer loss plus the object-presence loss; returns both losses."""
    images = batch["image"]
    # Mirror half the images: no caption or question depends on left/right, and it doubles the views.
    flip = torch.rand(images.shape[0], generator=flips) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    # Encode with gradients: MiniGPT4.encode_images runs the (normally frozen) encoder under no_grad.
    features = model.encoder(images)
    out = model({"image_features": features, "instruction": batch["instruction"], "answer": batch["answer"]})
    probe_loss = F.binary_cross_entropy_with_logits(probe(features), batch["objects"])
    optimizer.zero_grad(set_to_none=True)
    (out["loss"] + probe_weight * probe_loss).backward()
    # Clip over the model's parameters, then the probe's: the order fixes the float sum of the norm.
    torch.nn.utils.clip_grad_norm_([*model.parameters(), *probe.parameters()], 1.0)
    optimizer.step()
    return out["ce"].item(), probe_loss.item()


def train(model, probe: ObjectProbe, optimizer: torch.optim.Optimizer, dataset: ShapesQADataset,
          args: argparse.Namespace, start_time: float) -> list[dict]:
    """args.steps steps over reshuffled epochs; returns the log, one entry (mean losses) per 100 steps."""
    shuffle = torch.Generator().manual_seed(args.seed)
    flips = torch.Generator().manual_seed(args.seed + 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate, generator=shuffle)
    log, step, epoch, running = [], 0, 0, []
    while step < args.steps:
        dataset.set_epoch(epoch)
        for batch in loader:
            if step >= args.steps:
                break
            lr = linear_warmup_cosine(step, total_steps=args.steps, warmup_steps=args.warmup,
                                      warmup_lr=args.lr / 100, init_lr=args.lr, min_lr=args.lr / 50)
            for group in optimizer.param_groups:
                group["lr"] = lr
            running.append(train_step(model, probe, optimizer, batch, flips, args.probe_weight))
            step += 1
            if step % 100 == 0 or step == args.steps:
                entry = {"step": step, "epoch": epoch, "lr": lr, "loss": sum(r[0] for r in running) / len(running),
                         "probe_loss": sum(r[1] for r in running) / len(running),
                         "elapsed_s": round(time.perf_counter() - start_time, 1)}
                log.append(entry)
                running = []
                if args.val_every and step % args.val_every == 0 and step < args.steps:
                    entry["val"] = quick_val(model, Path(args.data), args.val_images)
                print(json.dumps(entry), flush=True)
        epoch += 1
    return log


def save_model(model, out_dir: Path, tokenizer_dir: Path, dtype: str, steps: int) -> None:
    """model.safetensors (in `dtype`) and model.yaml, the `model:` section that rebuilds it."""
    model.eval()
    state = {k: v.to(torch.bfloat16 if dtype == "bf16" else torch.float32) for k, v in model.state_dict().items()}
    save_state_file(out_dir / "model.safetensors", state,
                    metadata={"what": "shapes-world stage-0 base model", "steps": str(steps)})
    cfg = model_config(repo_relative(tokenizer_dir), repo_relative(out_dir / "model.safetensors"))
    (out_dir / "model.yaml").write_text(
        "# The `model:` section of the shapes-world base model (scripts/train_shapes_base.py writes it).\n"
        + yaml.safe_dump({"model": cfg}, sort_keys=False), encoding="utf-8")


def train_base_model(args: argparse.Namespace) -> dict:
    """The whole run (the arguments of scripts/train_shapes_base.py): the training world if missing, the
    tokenizer, training, model.safetensors + model.yaml + train_log.json in args.out; returns the log's summary."""
    start_time = time.perf_counter()
    data_dir, out_dir = Path(args.data), Path(args.out)
    ensure_training_world(data_dir)

    dataset = ShapesQADataset(data_dir, "train", image_size=IMAGE_SIZE,
                              question_fraction=args.question_fraction, seed=args.seed)
    tokenizer_dir = out_dir / "tokenizer"
    train_tokenizer(str(tokenizer_dir), tokenizer_corpus(dataset), TOKENIZER_VOCAB)
    torch.manual_seed(args.seed)
    model = build_model(model_config(str(tokenizer_dir)))
    model.requires_grad_(True)  # stage 0 trains everything; MiniGPT4 froze the encoder and the LLM
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, vocabulary {len(model.tokenizer)}", flush=True)
    probe = ObjectProbe(model.encoder.out_dim, len(CLASS_NAMES))
    named = list(model.named_parameters()) + list(probe.named_parameters())
    optimizer = make_optimizer(named, args.lr, args.weight_decay)
    log = train(model, probe, optimizer, dataset, args, start_time)
    train_seconds = time.perf_counter() - start_time
    save_model(model, out_dir, tokenizer_dir, args.dtype, args.steps)

    # Check what was saved (bf16 rounding included), not the in-memory fp32 weights.
    reloaded = build_model(model_config(str(tokenizer_dir), str(out_dir / "model.safetensors")))
    check = quick_val(reloaded, data_dir, args.val_images) if args.val_images > 0 else {}
    summary = {"args": vars(args), "world": TRAIN_WORLD, "parameters": n_params,
               "train_seconds": round(train_seconds, 1), "final_loss": log[-1]["loss"] if log else math.nan,
               "quick_val": check, "log": log}
    (out_dir / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary
