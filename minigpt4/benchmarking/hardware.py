"""What this machine can do, measured in the same process and with the same threads as the workload it is
compared with: the dense-matmul rate for a dtype, the memory copy bandwidth, the memory it has available."""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from minigpt4.benchmarking.measure import sync
from minigpt4.common.results_header import cpu_model


def _timed(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up: oneDNN / cuBLAS pick and cache their kernels on the first call
    sync(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of torch.matmul on two size × size matrices (2·size³ FLOPs each): the machine's own dense limit.
    `best` is the fastest repeat (the limit a workload is held against), `median` shows the noise around it."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    seconds = _timed(lambda: torch.matmul(a, b), device, repeats)
    flops = 2 * size ** 3
    return {"shape": [size, size, size], "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
            "tflops_best": flops / min(seconds) / 1e12, "tflops_median": flops / sorted(seconds)[repeats // 2] / 1e12}


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> dict[str, Any]:
    """Bytes moved per second by `dst.copy_(src)` of an `nbytes` buffer, counting the read and the write (2·nbytes
    per copy, as STREAM's copy). Far larger than any cache, so this is the memory's own rate."""
    src = torch.ones(nbytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), device, repeats)
    moved = 2 * src.numel() * src.element_size()
    return {"buffer_bytes": src.numel() * src.element_size(), "repeats": repeats,
            "gbps_best": moved / min(seconds) / 1e9, "gbps_median": moved / sorted(seconds)[repeats // 2] / 1e9}


def meminfo_bytes(field: str) -> int | None:
    """A field of /proc/meminfo (e.g. MemAvailable) in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can still get: MemAvailable on the CPU, the free memory of the GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return meminfo_bytes("MemAvailable")


def release_freed_memory(device: torch.device) -> bool:
    """Give memory freed by the last phase back to the OS (glibc malloc_trim; the CUDA cache on a GPU), so the next
    phase's resident-set peak is its own. False where there is no such call (not glibc)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return True
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def rss_bytes() -> int:
    """This process's resident set now (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_flags(*wanted: str) -> list[str]:
    """Which of `wanted` (e.g. avx512_bf16, amx_bf16) the CPU reports: they decide how fast bf16 matmuls run."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def machine_facts(device: torch.device) -> dict[str, Any]:
    facts: dict[str, Any] = {"device": str(device), "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
                             "cpu_flags": cpu_flags("avx512f", "avx512_bf16", "amx_bf16", "amx_tile"),
                             "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                             "mem_total_bytes": meminfo_bytes("MemTotal")}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return facts
