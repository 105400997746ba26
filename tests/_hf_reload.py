"""Reload an export with transformers' own classes only and run it (a helper of tests/test_export_hf.py).

    python tests/_hf_reload.py SPEC.json RESULT.json

SPEC: {"folder", "class", "images": [png paths], "questions": [str], "max_new_tokens", "stop": str | null,
       "eps": [null | float, ...]}   (eps: post_layernorm eps to run with; null = as exported)
RESULT: {"runs": {str(eps): [{"image", "question", "tokens", "last_logits"}]}, "loaded": {...}}

Importing anything of this project fails here (an import hook refuses `minigpt4`), so the export is shown to
work with plain transformers.
"""
from __future__ import annotations

import importlib.abc
import json
import sys


class RefuseProjectImports(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "minigpt4" or name.startswith("minigpt4."):
            raise ImportError(f"{name}: the export must load without this project's code")
        return None


sys.meta_path.insert(0, RefuseProjectImports())

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

torch.set_num_threads(1)  # a tiny model: more threads only wait for each other on a busy machine (tests/conftest.py)


def run_one(model, processor, image, question: str, spec: dict) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    extra = {"stop_strings": [spec["stop"]], "tokenizer": processor.tokenizer} if spec.get("stop") else {}
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        out = model.generate(**inputs, max_new_tokens=spec["max_new_tokens"], do_sample=False, **extra)
    return {"question": question, "tokens": out[0, inputs["input_ids"].shape[1]:].tolist(),
            "prompt_ids": inputs["input_ids"][0].tolist(), "last_logits": logits.tolist()}


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    cls = getattr(transformers, spec["class"])
    processor = AutoProcessor.from_pretrained(spec["folder"], local_files_only=True, backend="pil")
    model, info = cls.from_pretrained(spec["folder"], local_files_only=True, output_loading_info=True)
    model.eval()
    images = [Image.open(p).convert("RGB") for p in spec["images"]]
    runs = {}
    for eps in spec.get("eps", [None]):
        if eps is not None:
            model.vision_model.post_layernorm.eps = eps
        runs[str(eps)] = [dict(run_one(model, processor, image, q, spec), image=i)
                          for i, image in enumerate(images) for q in spec["questions"]]
    loaded = {"class": type(model).__name__, "processor": type(processor).__name__,
              "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
              "minigpt4_imported": any(m == "minigpt4" or m.startswith("minigpt4.") for m in sys.modules)}
    with open(result_path, "w") as handle:
        json.dump({"runs": runs, "loaded": loaded}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
