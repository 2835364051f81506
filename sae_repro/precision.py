"""When to compute in bf16: only where the hardware has native bf16 matmuls.

On a CPU with AMX (Intel Xeon 4th generation and later) a bf16 matmul ran ~4.5x faster than
fp32 on 2 threads; on a CPU without native bf16 (AVX2 only, e.g. the AMD EPYC machines this
project also runs on) oneDNN emulates it and the same matmul ran ~100x *slower* (1.3 vs 156
GFLOP/s at [2048, 576] x [576, 1536]). So bf16 is a per-machine decision: `resolve_bf16("auto")`
picks it where the CPU flags (or a CUDA device) promise native support, and the resolved bool is
what configs store, so caches keyed by a config tell bf16 and fp32 results apart.

Measured on the default model where bf16 was used: the forward under bf16 autocast moved the
held-out next-token loss by < 0.001 nats; a TopK SAE's held-out FVU with a bf16 encoder matmul
matched fp32 to 1e-4 (bench/README.md).

$SAE_REPRO_BF16 = 1 / 0 forces the choice of "auto" either way.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

BF16_CHOICES = (True, False, "auto")
_NATIVE_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: str = "cpu") -> bool:
    """True if `device` runs bf16 matmuls natively (CPU: AMX or AVX512-BF16; CUDA: Ampere+)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return any(flag in _cpu_flags() for flag in _NATIVE_FLAGS)


def resolve_bf16(value: bool | str, device: str = "cpu", name: str = "bf16") -> bool:
    """True / False as given; "auto" -> `native_bf16(device)` unless $SAE_REPRO_BF16 says."""
    if value is True or value is False:
        return value
    if value != "auto":
        raise ValueError(f"{name}={value!r}: expected True, False or 'auto'")
    forced = os.environ.get("SAE_REPRO_BF16")
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"$SAE_REPRO_BF16={forced!r}: expected '0' or '1'")
        return forced == "1"
    return native_bf16(device)
