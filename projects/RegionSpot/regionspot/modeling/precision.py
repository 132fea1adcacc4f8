"""The precision the frozen encoders compute in (``MODEL.REGIONSPOT.ENCODER_PRECISION``).

Both frozen parts, the localizer (SAM) and the semantic encoder (CLIP), hold their own
precision setting and run under :func:`encoder_autocast`; the trained head always computes in
float32 (its training AMP is the trainer's, ``SOLVER.AMP``). docs/speed.md lists the measured
deviations of each precision from float32.
"""

import logging
from typing import Optional

import torch

ENCODER_PRECISIONS = ("auto", "float32", "bfloat16", "float16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_encoder_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`ENCODER_PRECISIONS`.

    Raises:
        ValueError: another value (the message names ``MODEL.REGIONSPOT.ENCODER_PRECISION``).
    """
    if precision not in ENCODER_PRECISIONS:
        raise ValueError(f"MODEL.REGIONSPOT.ENCODER_PRECISION must be one of {ENCODER_PRECISIONS}, got {precision!r}")
    return precision


def resolve_encoder_precision(precision: str, device) -> torch.dtype:
    """The dtype a frozen encoder computes in on ``device``.

    "auto" is float16 on CUDA (the released implementation's autocast) and float32 on the CPU
    (exact); "float32", "bfloat16" and "float16" ask for that precision on any device
    (bfloat16 is fast on CPUs with AVX512-BF16/AMX and emulated, with one warning, on the
    others; float16 on the CPU is slow).

    Raises:
        ValueError: an unknown precision.
    """
    check_encoder_precision(precision)
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if precision == "bfloat16" and torch.device(device).type == "cpu":
        _warn_once_if_bfloat16_is_emulated()
    return _DTYPES[precision]


# CPU flags of native bfloat16 arithmetic, as /proc/cpuinfo lists them: x86 AVX512-BF16 and AMX
# (Cooper Lake, Sapphire Rapids and newer; AMD Zen 4 and newer), Arm's BF16 extension.
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
_warned_emulated_bfloat16 = False


def cpu_flags(path: str = "/proc/cpuinfo") -> Optional[set]:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on Arm) from ``path``; None where
    the file cannot be read (not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return set()


def _warn_once_if_bfloat16_is_emulated() -> None:
    """One warning per process when bfloat16 encoders run on a CPU whose flags list no native
    bfloat16 arithmetic: PyTorch then emulates it, 7.9x slower than float32 on a 2-vCPU AMD EPYC
    with AVX2 (docs/speed.md), where a user who chose it expected a speed-up."""
    global _warned_emulated_bfloat16
    if _warned_emulated_bfloat16:
        return
    flags = cpu_flags()
    if flags is None or flags & set(NATIVE_BFLOAT16_FLAGS):
        return
    _warned_emulated_bfloat16 = True
    logging.getLogger(__name__).warning(
        "MODEL.REGIONSPOT.ENCODER_PRECISION bfloat16 on a CPU without native bfloat16 (no %s flag): PyTorch "
        "emulates it, several times slower than float32 (7.9x on an AVX2 AMD EPYC); set it to float32 or auto "
        "here", "/".join(NATIVE_BFLOAT16_FLAGS))


def encoder_autocast(device, dtype: torch.dtype):
    """Autocast context for a frozen encoder on ``device`` at ``dtype`` (a no-op for float32)."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
