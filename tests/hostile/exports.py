"""The exporter (minigpt4/export, scripts/export_hf.py): a metrics.json of other weights or with wrong values, a full
or read-only disk while writing, damaged export folders given to --check / --to-trainable (a code-executing
pickle, a truncated model.safetensors, a malformed adavib_export.json), local paths in what an export publishes,
and the staging folders that killed exports leave. The kills themselves (SIGKILL, SIGTERM of a real export
process) are in tests/test_export_hf.py."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Callable
from unittest.mock import patch

import torch
from _hostile import ROOT, Case, Env, Exits2, Holds, no_model_build

from hostile.checkpoints import _ShellOnUnpickle

SHAPES_YAML = str(ROOT / "assets" / "shapes_base" / "model.yaml")
WIDTH = 128  # the shapes model's Q-Former and LLM width: its projector is Linear(128, 128)
METRICS = {"model": "shapes-b", "projector": "linear", "protocol": "pope-shapes + shapes-val",
           "chair": {"chair_s": 0.12, "chair_i": 0.05, "recall": 0.9, "mean_length": 14.7, "n_captions": 4,
                     "n_images": 4, "bootstrap": {"ci": {"chair_i": [0.03, 0.07]}}},
           "pope": {"rule": "reference", "splits": {"random": {"accuracy": 0.9, "f1": 0.9}}}}


# ------------------------------------------------------------------------------------------------- helpers


def _export(env: Env, *extra: str, formats: tuple[str, ...] = ("minigpt4-pth",)) -> int:
    """scripts/export_hf.py on the committed shapes model into {tmp}/out; its exit status."""
    from minigpt4.export import cli

    return cli.main(["--cfg-path", SHAPES_YAML, "--format", *formats, "--out", str(env.tmp / "out"), *extra])


def _checkpoint(env: Env, name: str, value: float) -> Path:
    """A linear projector checkpoint (this project's trainable.safetensors) whose every weight is `value`."""
    from minigpt4.models.checkpoints import save_trainable

    path = env.tmp / name
    save_trainable(path, {"projector.llama_proj.weight": torch.full((WIDTH, WIDTH), value),
                          "projector.llama_proj.bias": torch.full((WIDTH,), value)})
    return path


def _weights_of(ckpt: Path | None) -> dict:
    """metrics.json's "weights", as evaluate.py records it, for the shapes model with `ckpt` (None: without)."""
    from minigpt4.common.config_files import load_model_config
    from minigpt4.common.provenance import weight_digests
    from minigpt4.export.records import weight_paths

    cfg = load_model_config(SHAPES_YAML, [f"model.ckpt={ckpt}"] if ckpt else [])
    return weight_digests(weight_paths(cfg))


def _metrics(env: Env, weights: dict | None, changes: dict | None = None) -> Path:
    """{tmp}/eval/metrics.json: METRICS with `weights` as the weight record (None: none) and `changes` on top."""
    data = {**METRICS, **({"weights": weights} if weights is not None else {}), **(changes or {})}
    path = env.tmp / "eval" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _nothing_written(env: Env) -> bool:
    return not (env.tmp / "out").exists() and not list(env.tmp.glob(".out.export-tmp-*"))


def _refused_before_building(env: Env, *argv: str) -> tuple[int, str]:
    """An export that must be refused before any model is built, leaving nothing behind."""
    with no_model_build():
        rc = _export(env, *argv)
    assert _nothing_written(env)
    return rc, ""


def _real_export(env: Env, formats: tuple[str, ...]) -> Path:
    """A complete export of the shapes model in `formats`, written once per module, copied into {tmp}/export for a
    row to damage."""
    from minigpt4.export import cli

    made = env.shared.root / ("export-" + "-".join(formats))
    if not made.exists():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
            assert cli.main(["--cfg-path", SHAPES_YAML, "--format", *formats, "--out", str(made)]) == 0
    return Path(shutil.copytree(made, env.tmp / "export"))


def _damaged_export(damage: Callable[[Path], None], mode: str, env: Env,
                    formats: tuple[str, ...] = ("blip2-hf", "minigpt4-pth")) -> tuple[int, str]:
    """--check or --to-trainable on a real export after `damage`."""
    from minigpt4.export import cli

    folder = _real_export(env, formats)
    damage(folder)
    argv = ["--check", str(folder)] if mode == "check" else ["--to-trainable", str(folder), "--out",
                                                              str(env.tmp / "trainable.safetensors")]
    rc = cli.main(argv)
    assert not (env.tmp / "ran").exists()  # a pickle's payload never ran
    assert not (env.tmp / "trainable.safetensors").exists()
    return rc, ""


def _code_executing_pth(folder: Path) -> None:
    marker = folder.parent / "ran"
    torch.save({"model": _ShellOnUnpickle(marker)}, folder / "minigpt4_projector.pth")  # as an attacker saves it


def _truncate_weights(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _malformed_manifest(folder: Path) -> None:
    (folder / "adavib_export.json").write_text('{"formats": {"blip2-hf": {}, ')


def _manifest_formats_a_list(folder: Path) -> None:
    (folder / "adavib_export.json").write_text('{"formats": ["blip2-hf"]}')


# ---------------------------------------------------------------------------------------------- the rows


def metrics_of_other_weights(env: Env) -> tuple[int, str]:
    evaluated = _checkpoint(env, "a.safetensors", 0.01)
    exported = _checkpoint(env, "b.safetensors", 0.02)
    metrics = _metrics(env, _weights_of(evaluated))
    return _refused_before_building(env, "--ckpt", str(exported), "--metrics", str(metrics))


def metrics_of_the_base_model(env: Env) -> tuple[int, str]:
    exported = _checkpoint(env, "b.safetensors", 0.02)
    metrics = _metrics(env, _weights_of(None))
    return _refused_before_building(env, "--ckpt", str(exported), "--metrics", str(metrics))


def metrics_with_provenance_of_other_weights(env: Env) -> tuple[int, str]:
    """A metrics.json from before the "weights" record: the provenance.json beside it is what says."""
    from minigpt4.common.config_files import load_model_config
    from minigpt4.common.provenance import write_provenance
    from minigpt4.export.records import weight_paths

    evaluated = _checkpoint(env, "a.safetensors", 0.01)
    exported = _checkpoint(env, "b.safetensors", 0.02)
    metrics = _metrics(env, None)
    evaluated_cfg = load_model_config(SHAPES_YAML, [f"model.ckpt={evaluated}"])
    write_provenance({}, metrics.parent, weight_paths=weight_paths(evaluated_cfg), data_paths=None)
    return _refused_before_building(env, "--ckpt", str(exported), "--metrics", str(metrics))


def metrics_without_weight_record(env: Env) -> tuple[int, str]:
    return _refused_before_building(env, "--metrics", str(_metrics(env, None)))


def metrics_with(changes: dict, env: Env) -> tuple[int, str]:
    """A metrics.json of these very weights, with `changes` on top."""
    metrics = _metrics(env, _weights_of(None), changes)
    return _refused_before_building(env, "--metrics", str(metrics))


def metrics_of_these_weights(env: Env) -> bool:
    exported = _checkpoint(env, "b.safetensors", 0.02)
    metrics = _metrics(env, _weights_of(exported))
    assert _export(env, "--ckpt", str(exported), "--metrics", str(metrics)) == 0
    card = (env.tmp / "out" / "README.md").read_text()
    assert "matches the SHA-256 of every weight file of this export" in card and "| 12.0 |" in card
    return True


def disk_full_before_writing(env: Env) -> tuple[int, str]:
    from minigpt4.export import staging

    with patch.object(staging, "free_bytes", lambda path: 10_000):
        rc = _export(env)
    assert _nothing_written(env)
    return rc, ""


def write_fails(code: int, env: Env) -> tuple[int, str]:
    """The disk refuses the export's first file (torch.save of minigpt4_projector.pth) with `code`."""
    def refuse(obj, path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    with patch.object(torch, "save", refuse):
        rc = _export(env)
    assert _nothing_written(env)
    return rc, ""


def _text_files(folder: Path) -> dict[str, str]:
    texts = {}
    for path in sorted(folder.rglob("*")):
        try:
            texts[path.name] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError):
            continue  # weights
    return texts


def recorded_paths(extra: tuple[str, ...], env: Env) -> bool:
    """A full export with a checkpoint, its training config and metrics in {tmp}: do the written text files name
    a local folder (the test's, the repository's, the home folder)?"""
    run = env.tmp / "home" / "someone" / "run"
    (run / "final").mkdir(parents=True)
    ckpt = shutil.move(_checkpoint(env, "trainable.safetensors", 0.02), run / "final" / "trainable.safetensors")
    train_config = {"model": {"arch": "minigpt4", "mm_projector_type": "linear"},
                    "run": {"output_dir": str(run), "seed": 0}}
    (run / "final" / "config.json").write_text(json.dumps(train_config))
    metrics = _metrics(env, _weights_of(Path(ckpt)))
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        assert _export(env, "--ckpt", str(ckpt), "--metrics", str(metrics), *extra,
                       formats=("blip2-hf", "minigpt4-pth")) == 0
    texts = _text_files(env.tmp / "out")
    assert {"README.md", "adavib_export.json", "config.json", "tokenizer.json"} <= set(texts)
    local = (str(env.tmp), str(ROOT), str(Path.home()), "/home/someone")
    named = sorted({name for name, text in texts.items() for folder in local if folder in text})
    manifest = json.loads(texts["adavib_export.json"])
    assert manifest["sources"]["model.ckpt"]["file"] == "trainable.safetensors"
    assert manifest["sources"]["model.ckpt"]["sha256"] in texts["README.md"]
    return named


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: no process has this pid until the kernel hands it out again
    return child.pid


def sweep_staging(env: Env) -> list[str]:
    """Staging folders in the parent of --out: of a dead process of this host, of a live one (this process's
    parent), of another host. The next export removes the first only."""
    from minigpt4.export.staging import this_host

    host = this_host()
    for name in (f".old.export-tmp-{_dead_pid()}-{host}", f".busy.export-tmp-{os.getppid()}-{host}",
                 f".far.export-tmp-{_dead_pid()}-another-host.example"):
        (env.tmp / name).mkdir()
        (env.tmp / name / "model.safetensors").write_bytes(b"\0" * 1000)
    assert _export(env) == 0
    return sorted(p.name.split(".export-tmp-")[0] for p in env.tmp.glob(".*.export-tmp-*"))


# ------------------------------------------------------------------------------------------------ the table

_METRICS_ERROR = ("--metrics: ", "eval/metrics.json: ")
_OTHER_WEIGHTS = "describes other weights than this export"

EXPORT_CASES = [
    Case("export/metrics/of-other-weights", metrics_of_other_weights,
         Exits2((_OTHER_WEIGHTS, "(recorded in it: model.ckpt: metrics a.safetensors (sha256 ",
                 "export b.safetensors (sha256 ", "give the metrics.json of an evaluation of these weights"),
                prefix="error: ")),
    Case("export/metrics/of-the-base-model", metrics_of_the_base_model,
         Exits2((_OTHER_WEIGHTS, "model.ckpt: metrics not set, export b.safetensors (sha256 "), prefix="error: ")),
    Case("export/metrics/provenance-beside-of-other-weights", metrics_with_provenance_of_other_weights,
         Exits2((_OTHER_WEIGHTS, "/eval/provenance.json: model.ckpt: metrics a.safetensors (sha256 "),
                prefix="error: ")),
    Case("export/metrics/no-weight-record", metrics_without_weight_record,
         Exits2(("does not record the weights it was made with", "run evaluate.py again"), prefix="error: ")),
    Case("export/metrics/weights-a-list", partial(metrics_with, {"weights": ["model.ckpt"]}),
         Exits2(("metrics.json: weights: expected a mapping of config key -> file record",), prefix="error: ")),
    Case("export/metrics/chair_s-a-string",
         partial(metrics_with, {"chair": {**METRICS["chair"], "chair_s": "0.12"}}),
         Exits2((*_METRICS_ERROR, "chair.chair_s: expected a number, got the string '0.12'"), prefix="error: ")),
    Case("export/metrics/pope-splits-a-list",
         partial(metrics_with, {"pope": {"rule": "reference", "splits": [{"accuracy": 0.9, "f1": 0.9}]}}),
         Exits2((*_METRICS_ERROR, "pope.splits: expected a JSON object"), prefix="error: ")),
    Case("export/metrics/interval-malformed",
         partial(metrics_with, {"chair": {**METRICS["chair"], "bootstrap": {"ci": {"chair_i": [0.07]}}}}),
         Exits2((*_METRICS_ERROR, "chair.bootstrap.ci.chair_i: expected an interval [low, high]"),
                prefix="error: ")),
    Case("export/metrics/interval-reversed",
         partial(metrics_with, {"chair": {**METRICS["chair"], "bootstrap": {"ci": {"chair_i": [0.07, 0.03]}}}}),
         Exits2((*_METRICS_ERROR, "chair.bootstrap.ci.chair_i: expected an interval [low, high] with low <= high"),
                prefix="error: ")),
    Case("export/metrics/of-these-weights", metrics_of_these_weights,
         Holds("exported; the card shows the numbers and that the metrics' weight record matches")),
    Case("export/disk-full/before-writing", disk_full_before_writing,
         Exits2(("cannot write the export", "/out: not enough space on its disk; it needs about", "(9.8 KiB free in",
                 "choose another --out"), prefix="error: ")),
    Case("export/disk-full/while-writing", partial(write_fails, errno.ENOSPC),
         Exits2(("/out (", "minigpt4_projector.pth): No space left on device; it needs about",
                 "Nothing was left behind; free some space"), prefix="error: ")),
    Case("export/read-only/while-writing", partial(write_fails, errno.EROFS),
         Exits2(("minigpt4_projector.pth): Read-only file system", "writable, then export again"), prefix="error: ")),
    Case("export/check/code-executing-pickle", partial(_damaged_export, _code_executing_pth, "check"),
         Exits2(("minigpt4_projector.pth is not a plain tensor checkpoint", "nothing was executed"),
                prefix="error: ")),
    Case("export/to-trainable/code-executing-pickle",  # a .pth-only export: μ comes from the .pth
         partial(_damaged_export, _code_executing_pth, "to-trainable", formats=("minigpt4-pth",)),
         Exits2(("minigpt4_projector.pth is not a plain tensor checkpoint", "nothing was executed"),
                prefix="error: ")),
    Case("export/check/truncated-model-safetensors", partial(_damaged_export, _truncate_weights, "check"),
         Exits2(("export/model.safetensors: not a readable safetensors file", "incomplete metadata"),
                prefix="error: ")),
    Case("export/to-trainable/truncated-model-safetensors",
         partial(_damaged_export, _truncate_weights, "to-trainable"),
         Exits2(("export/model.safetensors: not a readable safetensors file", "incomplete metadata"),
                prefix="error: ")),
    Case("export/check/malformed-manifest", partial(_damaged_export, _malformed_manifest, "check"),
         Exits2(("export/adavib_export.json:1:",), prefix="error: ")),
    Case("export/to-trainable/malformed-manifest", partial(_damaged_export, _malformed_manifest, "to-trainable"),
         Exits2(("export/adavib_export.json:1:",), prefix="error: ")),
    Case("export/to-trainable/manifest-formats-a-list",
         partial(_damaged_export, _manifest_formats_a_list, "to-trainable"),
         Exits2(("adavib_export.json: formats: expected a mapping of format name -> record, got list",),
                prefix="error: ")),
    Case("export/paths/names-and-sha256-by-default", partial(recorded_paths, ()),
         Holds("no written text file names a local folder; sources by file name and SHA-256")),
    Case("export/paths/full-paths-when-asked", partial(recorded_paths, ("--record-full-paths",)),
         Holds("--record-full-paths: the card and adavib_export.json name the absolute paths")),
    Case("export/staging/swept-when-its-process-is-gone", sweep_staging,
         Holds("the next export removes the staging folder of a dead process of this host only")),
]

EXPORT_VALUES = {  # what the Holds rows above return
    "export/paths/names-and-sha256-by-default": [],
    "export/paths/full-paths-when-asked": ["README.md", "adavib_export.json"],
    "export/staging/swept-when-its-process-is-gone": [".busy", ".far"],
}
