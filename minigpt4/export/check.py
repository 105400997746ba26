"""`--check DIR`: reload an export with transformers' own classes (nothing of this project's model code) and report
what was loaded: class, parameters, dtype, image tokens, the rendered chat template, a short greedy answer on a
grey image, and the side files. Any missing, unexpected or mis-shaped tensor is an error."""
from __future__ import annotations

from pathlib import Path

import torch

from minigpt4.export.folder import check_weight_files, json_object, read_manifest, read_projector_pth
from minigpt4.export.source import ExportError

CLASSES = {"llava": "LlavaForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration"}
SIDE_FILES = ("adavib_vib_head.safetensors", "minigpt4_projector.pth")


def _load_model(folder: Path, model_type: str):
    import transformers

    cls = getattr(transformers, CLASSES[model_type])
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True, dtype="auto")
    except (OSError, ValueError) as err:  # a missing or unreadable file of the folder: transformers names it
        raise ExportError(f"{folder}: {cls.__name__} cannot load it: {_first_line(err)}") from None
    problems = {k: sorted(map(str, v)) for k, v in info.items() if v}
    if problems:
        raise ExportError(f"{folder}: {cls.__name__} does not match the saved tensors: {problems}")
    return model.eval()


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _smoke_answer(model, processor, stop: str | None, max_new_tokens: int) -> dict:
    from PIL import Image

    size = processor.image_processor.size
    side = size.get("height") or size.get("shortest_edge") or 224
    image = Image.new("RGB", (side, side), (128, 128, 128))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    extra = {"stop_strings": [stop], "tokenizer": processor.tokenizer} if stop else {}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    new = out[0, inputs["input_ids"].shape[1]:]
    return {"prompt": prompt, "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "answer": processor.decode(new, skip_special_tokens=True), "answer_tokens": new.tolist()}


def _side_files(folder: Path) -> dict:
    found = {}
    for name in SIDE_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            from minigpt4.models.checkpoints import load_state_file

            tensors = load_state_file(path, check_values=False)
        else:
            tensors = read_projector_pth(path)
        found[name] = {k: list(v.shape) for k, v in tensors.items()}
    return found


def check_export(folder: str | Path, max_new_tokens: int = 8) -> dict:
    """Reload `folder` and return the report (raises ExportError when it does not load cleanly)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise ExportError(f"--check {folder}: not a folder")
    manifest = read_manifest(folder, required=False)
    report: dict = {"folder": str(folder), "side_files": _side_files(folder)}
    if not config_path.is_file():
        if not report["side_files"]:
            raise ExportError(f"{folder}: no config.json and no export side files: not an export folder")
        return report  # a minigpt4-pth-only export
    model_type = json_object(config_path, "a transformers model config").get("model_type")
    if model_type not in CLASSES:
        raise ExportError(f"{config_path}: model_type {model_type!r}; --check reads {', '.join(CLASSES)} exports")
    check_weight_files(folder)
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
    except (OSError, ValueError) as err:
        raise ExportError(f"{folder}: its processor (tokenizer, image processor) cannot be loaded: "
                          f"{_first_line(err)}") from None
    model = _load_model(folder, model_type)
    config = model.config
    report.update({
        "class": type(model).__name__, "processor": type(processor).__name__,
        "image_processor": type(processor.image_processor).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": ", ".join(sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})),
        "image_token_id": config.image_token_id, "vocab_size": config.text_config.vocab_size,
        "text_model": type(model.get_decoder()).__name__ if hasattr(model, "get_decoder") else None,
        "chat_template": processor.tokenizer.chat_template is not None,
    })
    report["smoke"] = _smoke_answer(model, processor, manifest.get("stop") if model_type == "blip-2" else None,
                                    max_new_tokens)
    return report


def format_report(report: dict) -> str:
    lines = [f"{report['folder']}:"]
    for key in ("class", "processor", "image_processor", "parameters", "dtype", "image_token_id", "vocab_size",
                "text_model", "chat_template"):
        if key in report:
            lines.append(f"  {key}: {report[key]:,}" if isinstance(report[key], int) and key == "parameters"
                         else f"  {key}: {report[key]}")
    if "smoke" in report:
        smoke = report["smoke"]
        lines.append(f"  prompt ({smoke['prompt_tokens']} tokens): {smoke['prompt']!r}")
        lines.append(f"  greedy answer on a grey image: {smoke['answer']!r}")
    for name, shapes in report["side_files"].items():
        lines.append(f"  {name}: " + ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items()))
    return "\n".join(lines)
