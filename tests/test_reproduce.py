"""scripts/reproduce_adavib_minigpt4.sh end to end on tiny stand-ins for the user's files: an HF-format LLM
folder, a converted encoder, a MiniGPT-4-format projector .pth, a caption JSON and a COCO-style folder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_user_files(root, tiny_model_factory):
    from minigpt4.models.checkpoints import save_state_file

    model = tiny_model_factory("linear", seed=1)
    model.llm.save_pretrained(root / "vicuna")
    model.tokenizer.save_pretrained(root / "vicuna")
    encoder_state = {k: v.contiguous() for k, v in model.encoder.state_dict().items()}
    save_state_file(str(root / "encoder.safetensors"), encoder_state)
    torch.save({"model": {k: v.clone() for k, v in model.projector.state_dict().items()}}, root / "projector.pth")
    rng = np.random.default_rng(0)
    coco = root / "coco"
    for sub in ("train2014", "val2014", "annotations"):
        (coco / sub).mkdir(parents=True)
    captions = []
    for i in range(1, 9):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(coco / "train2014" / f"{i:012d}.jpg")
        captions.append({"image_id": i, "caption": "A dog and a chair in a room."})
    (root / "train.json").write_text(json.dumps(captions))
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (101, 102, 103)]
    for im in images:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(coco / "val2014" / im["file_name"])
    (coco / "annotations" / "instances_val2014.json").write_text(json.dumps({
        "images": images, "categories": [{"id": 18, "name": "dog"}],
        "annotations": [{"id": 1, "image_id": 101, "category_id": 18}]}))
    (coco / "annotations" / "captions_val2014.json").write_text(json.dumps({
        "images": images, "annotations": [{"id": 1, "image_id": 102, "caption": "a dog"}]}))
    pope = root / "pope"
    pope.mkdir()
    for split in ("random", "popular", "adversarial"):
        rows = [{"question_id": q, "image": images[q % 3]["file_name"], "text": "Is there a dog in the image?",
                 "label": "yes" if q % 2 else "no"} for q in range(4)]
        (pope / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_reproduction_script_runs_all_four_settings(tmp_path, tiny_model_factory):
    from minigpt4.common.tiny_models import TINY_NUM_QUERY_TOKENS, TINY_QFORMER, TINY_VISION

    _tiny_user_files(tmp_path, tiny_model_factory)
    sizes = [f"model.vision.{k}={v}" for k, v in TINY_VISION.items()]
    sizes += [f"model.qformer.{k}={v}" for k, v in TINY_QFORMER.items()]
    # The MiniGPT-4 recipes run model.precision: reference (CUDA fp16); on the CPU the tiny stand-ins run fp32.
    sizes += [f"model.num_query_tokens={TINY_NUM_QUERY_TOKENS}", "model.precision=fp32", "model.max_txt_len=32"]
    env = {
        **os.environ, "PY": sys.executable, "NGPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
        "ENCODER": str(tmp_path / "encoder.safetensors"), "VICUNA": str(tmp_path / "vicuna"),
        "PROJECTOR": str(tmp_path / "projector.pth"), "TRAIN_JSON": str(tmp_path / "train.json"),
        "COCO": str(tmp_path / "coco"), "OUT": str(tmp_path / "out"),
        # OPERA's 500 images are not in the tiny COCO: AdaVIB's CHAIR protocol on a list of the 3 that are
        "CHAIR_PROTOCOL": "adavib-chair", "CHAIR_IMAGES": str(tmp_path / "chair_ids.txt"),
        "MODEL_OPTIONS": " ".join(sizes),
        "TRAIN_OPTIONS": "run.device=cpu run.amp=none run.num_workers=0 run.batch_size=2 run.grad_accum_steps=2 "
                         "datasets.caption_json.vis_processor.image_size=28",
        "EVAL_OPTIONS": f"eval.device=cpu eval.bootstrap=20 eval.pope.dir={tmp_path / 'pope'} "
                        "eval.pope.max_new_tokens=3 eval.chair.max_new_tokens=6 eval.vis_processor.image_size=28",
    }
    (tmp_path / "chair_ids.txt").write_text("101\n102\n103\n")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts/reproduce_adavib_minigpt4.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (tmp_path / "out" / "results.md").read_text()
    for name in ("minigpt4-7b-released", "minigpt4-7b-linear-ce", "minigpt4-7b-vib-fixed-beta", "minigpt4-7b-adavib"):
        assert name in table, table
    rows = [line for line in table.splitlines() if line.startswith("| minigpt4-7b")]
    assert len(rows) == 4 and all("adavib-pope+overrides" in row and "adavib-chair+overrides" in row for row in rows)
    assert all("pope: adavib-pope, from jiaqi5598/AdaVIB: pope_eval.py; chair: adavib-chair, from jiaqi5598/AdaVIB: "
               "coco_eval.py" in row for row in rows), table
    paired = table.split("## Paired differences to linear-CE", 1)[1]
    for setting in ("original", "vib_fixed_beta", "adavib"):
        assert f"### {setting}" in paired, table
    assert paired.count("| chair_i |") == 3 and paired.count("| pope adversarial accuracy |") == 3, table
    for setting in ("linear_ce", "vib_fixed_beta", "adavib"):
        assert (tmp_path / "out" / f"train_{setting}" / "final" / "trainable.safetensors").exists()
