"""What a benchmark records about the machine it ran on (shared by the ``regionspot-benchmark`` subcommands)."""

import os
import platform
import resource
import subprocess
import sys
from typing import List, Optional


def device_name(device=None) -> str:
    """The GPU's name for a CUDA ``device``, else the CPU's model name and logical CPU count."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name or platform.machine() or 'unknown CPU'} ({os.cpu_count()} logical CPUs)"


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def git_commit(repo: str) -> Optional[str]:
    """The commit checked out in ``repo``, or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
