"""The precision the frozen encoders compute in (``MODEL.REGIONSPOT.ENCODER_PRECISION``).

Both frozen parts, the localizer (SAM) and the semantic encoder (CLIP), hold their own
precision setting and run under :func:`encoder_autocast`; the trained head always computes in
float32 (its training AMP is the trainer's, ``SOLVER.AMP``). docs/speed.md lists the measured
deviations of each precision from float32.
"""

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
    (bfloat16 is fast on CPUs with AVX512-BF16/AMX; float16 on the CPU is slow).

    Raises:
        ValueError: an unknown precision.
    """
    check_encoder_precision(precision)
    if precision == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return _DTYPES[precision]


def encoder_autocast(device, dtype: torch.dtype):
    """Autocast context for a frozen encoder on ``device`` at ``dtype`` (a no-op for float32)."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)
