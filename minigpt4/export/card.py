"""The export's model card (README.md): what the model is, where its weights came from, how it was trained (β, S,
the resolved training config), how it scored (with the protocol) and how to run it with plain transformers."""
from __future__ import annotations

import json
from pathlib import Path

from minigpt4.export.records import shown_name, without_local_paths
from minigpt4.export.source import ExportSource

USAGE = {
    "blip2-hf": '''```python
import torch
from PIL import Image
from transformers import AutoProcessor, Blip2ForConditionalGeneration

processor = AutoProcessor.from_pretrained("{dir}", backend="pil")   # PIL: pixel-identical preprocessing
model = Blip2ForConditionalGeneration.from_pretrained("{dir}", dtype=torch.float32).eval()
model.vision_model.post_layernorm.eps = {ln_eps:g}   # MiniGPT-4's ln_vision eps (see "How this differs")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe this image."}}]}}]
prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=Image.open("photo.jpg"), text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, stop_strings=[{end!r}], tokenizer=processor.tokenizer)
print(processor.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).split({end!r})[0].strip())
```''',
    "llava-hf": '''```python
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

processor = AutoProcessor.from_pretrained("{dir}", backend="pil")   # PIL: pixel-identical preprocessing
model = LlavaForConditionalGeneration.from_pretrained("{dir}").eval()
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe this image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=Image.open("photo.jpg"), text=prompt, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip())
```
lmms-eval (`--model llava_hf --model_args pretrained={dir}`), VLMEvalKit and vLLM read this folder as any
llava-hf checkpoint.''',
    "minigpt4-pth": '''The original MiniGPT-4 code loads `minigpt4_projector.pth` as its stage-2 projector: set
`ckpt:` in its eval config (e.g. eval_configs/minigpt4_eval.yaml) to this file. This project loads it with
`model.projector_path=minigpt4_projector.pth`.''',
}
# What the card's first paragraph adds for a MiniGPT-4 variant with other backbones (model.visual_tokens).
_VARIANT_NOTE = {"cnn_grid": " Its encoder is EfficientNet-Lite0 and its LLM SmolLM2-135M-Instruct (this project's "
                             "real-small model), not MiniGPT-4's ViT, Q-Former and Vicuna."}
# The real-small model's projector file: same keys as MiniGPT-4's, but only this project has its encoder.
USAGE_CNN_GRID = '''Only this project loads `minigpt4_projector.pth` for this model: the original MiniGPT-4 code has no
CNN encoder, and this `llama_proj` takes `model.grid_group` concatenated positions of EfficientNet-Lite0's
feature map per visual token.
`python evaluate.py --cfg-path eval_configs/real_small_base.yaml --options model.projector_path=minigpt4_projector.pth`
(or `demo.py` with the same arguments).'''


def projector_summary(cfg, train_config: dict | None) -> dict:
    """Projector kind and VIB settings, from the training config of the run when there is one."""
    model = (train_config or {}).get("model") or {}
    vib = {**dict(cfg.vib), **(model.get("vib") or {})}
    kind = model.get("mm_projector_type", cfg.mm_projector_type)
    from omegaconf import OmegaConf

    from minigpt4.eval.labels import projector_label  # the results table's projector column, same words

    label = projector_label(OmegaConf.create({"mm_projector_type": kind, "vib": vib}))
    return {"kind": kind, "label": label, "vib": vib if kind == "vib" else None,
            "from": "training config" if model else "export config"}


def _sources_table(sources: dict) -> list[str]:
    """Config key, file (its path with --record-full-paths) and SHA-256 of each base weight source."""
    lines = ["| config key | file | SHA-256 |", "|---|---|---|"]
    for key, record in sources.items():
        if record.get("kind") == "file":
            digest = record["sha256"]
        elif record.get("kind") == "dir":
            digest = f"{record['num_files']} files (each hashed in adavib_export.json)"
        else:
            digest = record.get("kind", "not hashed")
        lines.append(f"| `{key}` | `{shown_name(record)}` | `{digest}` |")
    return lines


def _training_section(source: ExportSource, projector: dict, manifest: dict) -> list[str]:
    lines = ["## Training", ""]
    run = (source.train_config or {}).get("run") or {}
    lines.append(f"- projector: **{projector['label']}** ({projector['from']})")
    if projector["vib"]:
        vib = projector["vib"]
        lines.append(f"- β = {vib['beta']:g}, S = {vib['num_samples']} noise samples, adaptive weight α = "
                     f"-log(H/log V): {vib['adaptive']}, KL on: {vib['kl_on']}, "
                     f"reparameterize: {vib['reparameterize']}")
    keys = ("lr_sched", "init_lr", "min_lr", "warmup_steps", "batch_size", "grad_accum_steps", "max_epoch",
            "iters_per_epoch", "max_steps", "amp", "seed")
    if run:
        lines.append("- recipe: " + ", ".join(f"{k} = {run[k]}" for k in keys if k in run))
    if source.train_config is None:
        lines += ["", "No resolved training config was found next to the checkpoint (pass --train-config)."]
        return lines
    config = source.train_config if manifest.get("full_paths") else without_local_paths(source.train_config)
    body = json.dumps(config, indent=2, default=str)
    record = manifest.get("training_config") or {}
    where = f"`{shown_name(record)}`, sha256 `{record.get('sha256')}`"
    paths = "" if manifest.get("full_paths") else "; absolute paths shortened to their file or folder name"
    return lines + ["", f"<details><summary>Resolved training config ({where}{paths})</summary>", "",
                    "```json", body, "```", "</details>"]


def _evaluation_section(metrics_path: str | None, manifest: dict) -> list[str]:
    if metrics_path is None:
        return ["## Evaluation", "", "Not given (export with `--metrics out/eval/<name>/metrics.json`)."]
    from minigpt4.eval.metrics_file import load_metrics_file
    from minigpt4.eval.results_table import results_table

    metrics = load_metrics_file(metrics_path)
    record = manifest.get("metrics") or {}
    checked = (f" Its weight record ({record['weights_checked_against']}) matches the SHA-256 of every weight "
               "file of this export." if record.get("weights_checked_against") else "")
    lines = ["## Evaluation", "", f"From `{shown_name(record)}` (sha256 `{record.get('sha256')}`; evaluate.py, this "
             "project's scorers: CHAIR as Rohrbach et al.'s reference, POPE with the rule named in the protocol; ± "
             f"is half the 95 % bootstrap interval over images).{checked}", "", f"- protocol: `{metrics['protocol']}`"]
    chair = metrics.get("chair") or {}
    if chair:
        lines.append(f"- CHAIR: {chair.get('n_captions')} captions of {chair.get('n_images')} images")
    pope = metrics.get("pope") or {}
    if pope.get("pope_version") or pope.get("rule"):
        lines.append(f"- POPE: data {pope.get('pope_version', '?')}, answer rule {pope.get('rule', '?')}")
    return lines + ["", results_table([metrics_path]).rstrip()]


def _differences_section(formats: dict) -> list[str]:
    lines = ["## How this differs from the model it was exported from", ""]
    for name, info in formats.items():
        for diff in info.get("differences", []):
            mark = {True: "exact", False: "differs", None: "depends on dtype"}[diff["exact"]]
            lines.append(f"- **{name}, {diff['what']}** ({mark}): {diff['detail']}")
        check = info.get("prompt_check")
        if check:
            verdict = ("equal" if check["equal"] else f"DIFFERENT from token {check['first_difference']} on: this "
                       f"project {check['this_project_tokens_near']}, export {check['export_tokens_near']} "
                       f"({check['num_tokens']}); build prompt ids as this project does to match it exactly")
            lines.append(f"- **{name}, prompt tokens** (checked at export): the chat template + tokenizer give "
                         f"this project's ids for {check['question']!r}: {verdict}.")
    return lines


def model_card(source: ExportSource, manifest: dict, metrics_path: str | None) -> str:
    cfg = source.cfg
    projector = projector_summary(cfg, source.train_config)
    formats = manifest["formats"]
    family = "LLaVA-1.5" if cfg.arch == "llava15" else "MiniGPT-4"
    tags = ["adavib", "llava" if cfg.arch == "llava15" else "minigpt4", "variational-information-bottleneck",
            "object-hallucination"]
    front = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags:"]
    front += [f"- {t}" for t in tags] + ["---", ""]
    lines = front + [f"# {family} with the {projector['label']} projector", "",
                     f"{family} whose projector was trained by minigpt4-adavib (AdaVIB: Bai et al., AAAI 2025, "
                     "arXiv 2502.20750). At inference the VIB's visual tokens are its mean head μ, so this is a "
                     f"standard {family} model: the frozen parts are the base weights below, μ is the projector."
                     + _VARIANT_NOTE.get(cfg.get("visual_tokens"), ""),
                     "", "## Files", "", "| file | what |", "|---|---|"]
    lines += [f"| `{name}` | {what} |" for name, what in manifest["files"].items()]
    lines += ["", "## Base weights", ""] + _sources_table(manifest["sources"]) + [""]
    lines += _training_section(source, projector, manifest) + [""]
    lines += _evaluation_section(metrics_path, manifest) + [""]
    lines += ["## Use", ""]
    end = manifest.get("stop") or ""
    from minigpt4.models.encoders import LN_VISION_EPS

    for name in formats:
        usage = USAGE_CNN_GRID if cfg.get("visual_tokens") == "cnn_grid" else USAGE[name]
        lines += [usage.format(dir=".", end=end, ln_eps=LN_VISION_EPS), ""]
    lines += _differences_section(formats) + [""]
    if manifest.get("vib_head"):
        lines += ["## Continue training", "", f"`{manifest['vib_head']}` holds the VIB σ head (`llama_proj_std`) and "
                  "the prior (`mu_p`, `std_p`) in fp32, named as in this project's trainable.safetensors. "
                  "`python -m minigpt4.export --to-trainable . --out trainable.safetensors` joins them with μ "
                  "from this folder; train on with `model.ckpt=trainable.safetensors`.", ""]
    if manifest.get("notes"):
        lines += ["## Export notes", ""] + [f"- {note}" for note in manifest["notes"]] + [""]
    return "\n".join(lines)


def write_model_card(out: Path, source: ExportSource, manifest: dict, metrics_path: str | None) -> None:
    (out / "README.md").write_text(model_card(source, manifest, metrics_path), encoding="utf-8")
