"""The full-size 7B model on the meta device: parameter counts per component (no weights, no memory)."""
import json
import os
import subprocess
import sys

from _scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _summary(capsys, cfg: str, *options: str) -> dict:
    """The script's main() in this process: building the meta model takes 0.2 s, a fresh interpreter's imports 5 s
    (the command line itself, exit code and all, is run by the duplicate-key test below)."""
    argv = ["--cfg-path", os.path.join(ROOT, cfg)] + (["--options", *options] if options else [])
    assert load_script("model_summary").main(argv) == 0
    return json.loads(capsys.readouterr().out)["params"]


def test_7b_minigpt4_counts_for_vib_and_linear(capsys):
    vib = _summary(capsys, "train_configs/adavib_minigpt4_7b.yaml")
    assert vib["vision"] == 985_949_440  # 39-block EVA ViT-g ≈ 985.9 M
    assert vib["ln_vision"] == 2 * 1408
    assert vib["query_tokens"] == 32 * 768
    assert vib["projector_trainable"] == 6_307_840  # μ head + σ head (2 × 3,149,824) + prior (2 × 4096)
    assert vib["llm"] == 6_738_415_616 and vib["llm_trainable"] == 0
    assert vib["trainable"] == vib["projector_trainable"]
    linear = _summary(capsys, "train_configs/adavib_minigpt4_7b.yaml", "model.mm_projector_type=linear")
    assert linear["projector_trainable"] == 3_149_824  # 768 × 4096 + 4096


def test_a_duplicate_key_is_one_line_naming_the_file_and_line(tmp_path):
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("model:\n  arch: minigpt4\n  mm_projector_type: vib\n  mm_projector_type: linear\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/model_summary.py"), "--cfg-path", str(cfg)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == (f"config error: {cfg}:4:3: duplicate key 'mm_projector_type' (in the mapping "
                                   "that starts on line 2); each key may appear once")
