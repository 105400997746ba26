"""On-disk cache of the frozen encoder's outputs (Q-Former queries, or LLaVA's patch features).

The vision tower is the only part of evaluation that does not depend on the projector, so repeated
evaluations, fixed-β / AdaVIB sweeps and POPE (every image is asked 6 questions per split, 18 over the three
splits) can encode each image once and reuse the result. This only holds for deterministic preprocessing
(the eval processor, or training with the eval processor); random crops must never be cached.

An entry is valid for one (image file, preprocessing, encoder) combination. Its key is

    sha256( namespace digest | sha256(image file bytes) )
    namespace = {format, preprocessing settings, encoder fingerprint, encoder architecture, dtype, device type}

where the encoder fingerprint is the SHA-256 of every tensor of the encoder's state dict (names, dtypes,
shapes and bytes), computed once per run. Changing the weights, the image size, the normalisation, the dtype
or the device therefore misses instead of returning stale features.

Layout: `root/ab/cd/<key>.safetensors`, one file per (image, namespace). Every write goes to a temporary file
in the same folder followed by os.replace, so concurrent writers (ranks of a torchrun evaluation, two sweeps
sharing a folder) never leave a torn entry: a reader sees the old file, the new one or none. An entry that
cannot be read or does not match what the key promises is logged, counted and recomputed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from minigpt4.common.files import NotRegularFileError, sha256_file

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_TENSOR_NAME = "features"


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 over the module's state dict (sorted names, dtypes, shapes, raw bytes). Run it once: hashing
    a 1 B-parameter encoder reads its ~2 GB of weights (a few seconds)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.is_meta:
            raise ValueError(f"cannot fingerprint {name}: the encoder has no weights yet (meta device)")
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_namespace(encoder: nn.Module, preprocessing: dict[str, Any]) -> dict[str, Any]:
    """Everything besides the image bytes that decides the encoder's output for an image.

    repr(encoder) records the architecture (widths, norm eps, activations); the attention implementation is
    read from the Hugging Face sub-configs (it changes results at rounding level, which a cache must not hide).
    """
    param = next(encoder.parameters())
    attention = sorted({str(getattr(m.config, "_attn_implementation", None))
                        for m in encoder.modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")})
    return {
        "format": CACHE_FORMAT,
        "preprocessing": preprocessing,
        "encoder_weights": state_fingerprint(encoder),
        "encoder_arch": hashlib.sha256(repr(encoder).encode()).hexdigest(),
        "attention": attention,
        "dtype": str(param.dtype),
        "device_type": param.device.type,
    }


class FeatureCache:
    """Feature tensors by image-file digest, for one namespace (see module docstring)."""

    def __init__(self, root: str | os.PathLike, namespace: dict[str, Any]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        canonical = json.dumps(namespace, sort_keys=True, separators=(",", ":"), default=str)
        self.namespace_digest = hashlib.sha256(canonical.encode()).hexdigest()
        self.hits = self.misses = self.corrupt = 0

    def path_for(self, image_digest: str) -> Path:
        key = hashlib.sha256(f"{self.namespace_digest}|{image_digest}".encode()).hexdigest()
        return self.root / key[:2] / key[2:4] / f"{key}.safetensors"

    def get(self, image_digest: str) -> torch.Tensor | None:
        """The cached features, or None (a miss; a damaged entry is logged, counted and treated as a miss)."""
        path = self.path_for(image_digest)
        if not path.exists():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            problem = self._check(tensors, meta, image_digest)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            problem = f"unreadable ({type(err).__name__}: {err})"
        if problem is not None:
            log.warning("feature cache: damaged entry %s (%s); recomputing it", path, problem)
            self.corrupt += 1
            self.misses += 1
            return None
        self.hits += 1
        return tensors[_TENSOR_NAME]

    def _check(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], image_digest: str) -> str | None:
        if set(tensors) != {_TENSOR_NAME}:
            return f"holds tensors {sorted(tensors)}, expected only {_TENSOR_NAME!r}"
        if meta.get("namespace") != self.namespace_digest or meta.get("image_sha256") != image_digest:
            return "metadata does not match its key"
        features = tensors[_TENSOR_NAME]
        if features.dim() != 2 or not torch.isfinite(features.float()).all():
            return f"features of shape {tuple(features.shape)} or with non-finite values"
        return None

    def put(self, image_digest: str, features: torch.Tensor) -> Path:
        """Store (N, D) features atomically: temporary file in the same folder, then os.replace."""
        if features.dim() != 2:
            raise ValueError(f"feature cache entries are (tokens, width) tensors, got {tuple(features.shape)}")
        path = self.path_for(image_digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
        metadata = {"format": str(CACHE_FORMAT), "namespace": self.namespace_digest, "image_sha256": image_digest}
        try:
            save_file({_TENSOR_NAME: features.detach().to("cpu").contiguous().clone()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt}


class CachedFeatureSource:
    """image path -> encoder features (N, D) on the CPU, from the cache or by load + preprocess + encode.

    `load_pixels(path)` returns the preprocessed (3, H, W) tensor or None for a bad image (then None is
    returned too, so callers skip it the same way they skip bad images without a cache).
    """

    def __init__(self, model: nn.Module, cache: FeatureCache, load_pixels: Callable[[str], torch.Tensor | None],
                 memory_entries: int = 4096):
        self.model, self.cache, self.load_pixels = model, cache, load_pixels
        self.encoded = 0  # images that went through the vision tower in this run
        self._digests: dict[str, str] = {}
        # POPE asks 6 questions per image and split: keep recent entries in memory instead of re-reading the
        # file each time (32×768 bf16 features are 48 KB; 4096 of them about 200 MB).
        self._recent: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memory_entries = memory_entries

    def _remember(self, digest: str, features: torch.Tensor) -> torch.Tensor:
        self._recent[digest] = features
        self._recent.move_to_end(digest)
        while len(self._recent) > self._memory_entries:
            self._recent.popitem(last=False)
        return features

    def digest(self, path: str) -> str:
        if path not in self._digests:
            try:  # refuses a FIFO or a link to /dev/zero from its metadata: hashing one would never end
                self._digests[path] = sha256_file(path, "image")
            except (OSError, NotRegularFileError):
                self._digests[path] = ""  # unreadable: let load_pixels report it (or skip it) as usual
        return self._digests[path]

    def __call__(self, path: str) -> torch.Tensor | None:
        digest = self.digest(path)
        if digest in self._recent:
            return self._remember(digest, self._recent[digest])
        cached = self.cache.get(digest) if digest else None
        if cached is not None:
            return self._remember(digest, cached)
        return self._encode_and_store([path]).get(path)

    def prefill(self, paths: Iterable[str], batch_size: int) -> int:
        """Encode, in batches, every image of `paths` not cached yet; returns how many were encoded."""
        todo = []
        for path in dict.fromkeys(paths):
            digest = self.digest(path)
            if digest and not self.cache.path_for(digest).exists():
                todo.append(path)
        for start in range(0, len(todo), batch_size):
            self._encode_and_store(todo[start:start + batch_size])
        return len(todo)

    def _encode_and_store(self, paths: list[str]) -> dict[str, torch.Tensor]:
        loaded = [(p, self.load_pixels(p)) for p in paths]
        good = [(p, pixels) for p, pixels in loaded if pixels is not None]
        if not good:
            return {}
        features = self.model.encode_images(torch.stack([pixels for _, pixels in good])).to("cpu")
        self.encoded += len(good)
        out = {}
        for (path, _), row in zip(good, features):
            row = row.clone()  # its own storage: a view would keep (and save) the whole batch
            if self.digest(path):
                self.cache.put(self.digest(path), row)
                self._remember(self.digest(path), row)
            out[path] = row
        return out


def build_feature_source(model: nn.Module, root: str, preprocessing: dict[str, Any],
                         load_pixels: Callable[[str], torch.Tensor | None]) -> CachedFeatureSource:
    """The cache under `root` for this model's encoder and these preprocessing settings."""
    cache = FeatureCache(root, encoder_namespace(model.encoder, preprocessing))
    log.info("feature cache %s (namespace %s…)", root, cache.namespace_digest[:12])
    return CachedFeatureSource(model, cache, load_pixels)
