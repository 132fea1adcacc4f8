"""Launch one process per device, on one or several machines, with or without CUDA.

Detectron2's own ``launch`` (v0.6) asserts CUDA and hard-codes the NCCL backend, so
``--num-gpus 2`` cannot start on a CPU-only machine, and a worker that used
``comm.all_gather`` can abort at exit because Detectron2's cached gloo group outlives the
process group. This launcher is the same protocol (``torch.multiprocessing`` spawn, one
process per device, ``init_process_group`` with ``dist_url``, Detectron2's local process
group, ``comm.synchronize``) with the backend chosen by the machine: NCCL with CUDA, gloo
without, and a clean exit. It does not depend on how Detectron2 was installed.
"""

import logging
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def launch(main_func, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = None, args=(), timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on each of ``num_machines``.

    Args:
        main_func: the function each process runs.
        num_gpus_per_machine: processes on this machine (one per GPU; on a machine without
            CUDA, CPU processes with the gloo backend).
        num_machines, machine_rank: the job's machines and this one's rank.
        dist_url: rendezvous address, e.g. "tcp://10.0.0.1:29500"; "auto" picks a free local
            port (one machine only).
        args: arguments of ``main_func``.
        timeout: process-group timeout.

    Raises:
        ValueError: "auto" with several machines, or more processes than GPUs.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://HOST:PORT of machine 0")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(f"--num-gpus {num_gpus_per_machine} but this machine has {torch.cuda.device_count()} GPU(s)")
    mp.start_processes(_worker, nprocs=num_gpus_per_machine, start_method="spawn", join=True,
                       args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout))


def _set_local_group(world_size: int, per_machine: int, machine_rank: int) -> None:
    """Detectron2's group of the processes on this machine (``comm.get_local_rank``)."""
    if hasattr(comm, "create_local_process_group"):  # newer Detectron2
        comm.create_local_process_group(per_machine)
        return
    for i in range(world_size // per_machine):
        group = dist.new_group(list(range(i * per_machine, (i + 1) * per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def _worker(local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, timeout):
    cuda = torch.cuda.is_available()
    rank = machine_rank * per_machine + local_rank
    try:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=dist_url, world_size=world_size,
                                rank=rank, timeout=timeout)
    except Exception:
        logger.error("could not join the process group at %s (rank %d of %d)", dist_url, rank, world_size)
        raise
    _set_local_group(world_size, per_machine, machine_rank)
    if cuda:
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        # Release Detectron2's cached gloo group before the process group: otherwise the
        # process can abort at exit ("terminate called without an active exception").
        cached = getattr(comm, "_get_global_gloo_group", None)
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()
        if hasattr(comm, "_LOCAL_PROCESS_GROUP"):
            comm._LOCAL_PROCESS_GROUP = None
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """``DistributedDataParallel`` of ``model`` when several processes run (CUDA or CPU models;
    Detectron2 0.6's ``create_ddp_model`` passes GPU ``device_ids`` even for CPU models);
    the model itself in a single process."""
    if comm.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if next(model.parameters()).device.type == "cuda":
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    return DistributedDataParallel(model, **kwargs)
