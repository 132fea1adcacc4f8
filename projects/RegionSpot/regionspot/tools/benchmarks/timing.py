"""How the benchmarks time and measure: a synchronised timer, the median summary of samples,
the peak memory of a device, a resident-set-size sampler thread and the torch thread count of a
run. Shared by every subcommand of ``regionspot-benchmark`` (:mod:`regionspot.tools.benchmark`);
imports nothing of the subcommands.
"""

import contextlib
import os
import statistics
import threading
import time
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

from regionspot.tools.common import synchronize


def timed(fn: Callable[[], object], device) -> Tuple[object, float]:
    """Run ``fn`` once between two synchronisations of ``device`` (a no-op off CUDA), so that the
    time is the call's own work, queued kernels included.

    Args:
        fn: the call to time (no arguments).
        device: a ``torch.device`` or a string.

    Returns:
        ``(fn(), milliseconds)``, wall time by ``time.perf_counter``.
    """
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, (time.perf_counter() - start) * 1000.0


def summary(samples: Sequence[float]) -> Dict[str, object]:
    """``{"median", "min", "max", "samples"}`` of a non-empty sequence of timings (any unit).

    Raises:
        statistics.StatisticsError: ``samples`` is empty.
    """
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": list(samples)}


def peak_memory(device) -> int:
    """Peak memory so far in bytes: ``torch.cuda.max_memory_allocated`` on CUDA (tensors only,
    since the last reset), else the process's peak resident set size (``ru_maxrss``, since the
    process started, never reset)."""
    import torch

    from regionspot.environment import peak_rss_bytes

    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()


class RssSampler:
    """Peak resident set size of this process while a ``with`` block runs: a daemon thread reads
    ``/proc/self/statm`` every ``interval`` seconds (Linux only); ``start`` and ``peak`` are in
    bytes, ``peak`` read once more when the block ends."""

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.start = self.peak = 0

    def __enter__(self) -> "RssSampler":
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block (None or 0: torch's own count), restored
    afterwards: a benchmark's ``main`` may be called in-process (the tests).

    Raises:
        ValueError: ``threads`` is negative.
    """
    import torch

    if threads is not None and threads < 0:
        raise ValueError(f"--threads must be positive, got {threads}")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
