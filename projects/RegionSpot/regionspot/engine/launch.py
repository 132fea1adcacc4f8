"""Run a job's processes with PyTorch's elastic agent, the engine behind ``torchrun``.

Two ways in, one code path:

- started by ``torchrun`` (or any launcher that sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR`` / ``MASTER_PORT``, as torchrun, SLURM wrappers and Kubernetes operators do):
  the process joins the group with ``init_process_group("env://")``, takes its device from
  ``LOCAL_RANK`` and runs the job's function itself; nothing is spawned;
- ``--num-gpus N`` (and ``--num-machines`` / ``--machine-rank`` / ``--dist-url``, Detectron2's
  flags): :func:`launch` runs ``torch.distributed.launcher.api.elastic_launch``, the agent
  torchrun runs, with a c10d rendezvous: on one machine at a free loopback port, on several
  at ``--dist-url tcp://HOST:PORT`` (machine 0's address: the agent there hosts the store;
  the machines' ranks are assigned at the rendezvous, ``--machine-rank`` is not needed);
  its workers then take the first way. (A static rendezvous keeps one store across restarts,
  where the restarted gloo group would read the dead group's addresses.)

The backend follows the machine: NCCL with CUDA, gloo without (so all of this runs on a CPU
machine). ``max_restarts`` > 0 lets the agent restart the whole group when a rank dies
(``torchrun --max-restarts``); the restarted processes see ``TORCHELASTIC_RESTART_COUNT`` > 0
(:func:`restart_count`), which the trainer takes as ``--resume``. A rank that dies is named
on stderr with its exit code or signal, when the group restarts and when the job ends.
"""

import os
import socket
import sys
import uuid
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from detectron2.utils import comm

#: Process-group timeout when the config gives none (``DIST_TIMEOUT_MINUTES``; torch's default).
DEFAULT_TIMEOUT = timedelta(minutes=30)
#: The environment variables a torchrun-style launcher sets in each process it starts.
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class JobFailed(RuntimeError):
    """A process of the job failed; ``exit_code`` is the job's exit status and the message
    names the rank(s), their pid and their exit code or signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or a launcher setting its variables)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def restart_count() -> int:
    """How many times the elastic agent has restarted this job's group (0: the first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def env_world_size() -> int:
    """The job's number of processes as torchrun tells it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1


def env_rank() -> int:
    """This process's global rank as torchrun tells it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0")) if under_torchrun() else 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def launch(main_func, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = None, args=(), timeout: timedelta = DEFAULT_TIMEOUT, max_restarts: int = 0) -> None:
    """Run ``main_func(*args)`` in every process of the job (see the module docstring).

    Args:
        main_func: the function each process runs (a module-level function: it is pickled).
        num_gpus_per_machine: processes on this machine (one per GPU; without CUDA, CPU
            processes with gloo). Ignored under torchrun, which sets the job's size.
        num_machines, machine_rank: the job's machines and this one's rank (kept for
            Detectron2's command line; the c10d rendezvous assigns the ranks).
        dist_url: with several machines, the rendezvous address "tcp://HOST:PORT" of machine 0;
            one machine uses a free loopback port.
        args: arguments of ``main_func``.
        timeout: process-group timeout (how long a collective waits for a dead rank).
        max_restarts: how many times the agent restarts the group after a rank fails.

    Raises:
        ValueError: "auto" with several machines, or more processes than GPUs.
        JobFailed: a process of the job failed (the message names it).
    """
    if under_torchrun():
        run_in_group(main_func, args, timeout)
        return
    if num_machines * num_gpus_per_machine <= 1 and max_restarts <= 0:
        main_func(*args)
        return
    if max_restarts < 0:
        raise ValueError(f"--max-restarts must not be negative, got {max_restarts}")
    if num_machines == 1:  # a free loopback port (not Detectron2's default port, which jobs can share)
        endpoint = f"127.0.0.1:{_free_port()}"
    elif dist_url in (None, "auto"):
        raise ValueError("--dist-url auto works on one machine only; give tcp://HOST:PORT of machine 0")
    elif dist_url.startswith("tcp://"):
        endpoint = dist_url[len("tcp://"):]
    else:
        raise ValueError(f"--dist-url must be 'auto' or tcp://HOST:PORT, got {dist_url!r}")
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(f"--num-gpus {num_gpus_per_machine} but this machine has {torch.cuda.device_count()} GPU(s)")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=num_machines, max_nodes=num_machines, nproc_per_node=num_gpus_per_machine,
                          run_id=_run_id(dist_url if num_machines > 1 else None), rdzv_backend="c10d",
                          rdzv_endpoint=endpoint, rdzv_configs={"timeout": 900},
                          max_restarts=max_restarts, start_method="spawn", monitor_interval=0.5)
    try:
        with _reporting_agent():
            elastic_launch(config, _elastic_entry)(main_func, args, timeout)
    except ChildFailedError as e:
        raise JobFailed(describe_failures(e.failures), _exit_code(e.failures)) from None


def _run_id(dist_url) -> str:
    """The rendezvous id: the same on every machine of a job (derived from its address), unique
    on one machine."""
    if dist_url:
        return "regionspot-" + "".join(c if c.isalnum() else "-" for c in dist_url[len("tcp://"):])
    return f"regionspot-{uuid.uuid4().hex[:12]}"


def describe_failures(failures) -> str:
    """One line naming each failed rank of an elastic ``RunResult`` / ``ChildFailedError``
    (``{global rank: ProcessFailure}``): its pid and its exit code or signal."""
    parts = []
    for rank, failure in sorted(failures.items()):
        if failure.exitcode < 0:
            how = f"was killed by signal {failure.signal_name()}"
        else:
            how = f"exited with code {failure.exitcode}"
        parts.append(f"rank {rank} (pid {failure.pid}) {how}")
    return "; ".join(parts)


def _exit_code(failures) -> int:
    """The exit status of the first rank that failed (a shell's 128 + N for signal N)."""
    if not failures:
        return 1
    first = min(failures.values(), key=lambda f: f.timestamp)
    return 128 - first.exitcode if first.exitcode < 0 else (first.exitcode or 1)


@contextmanager
def _reporting_agent():
    """Have the agent that :func:`launch` starts say which rank failed before it restarts the group.

    torch's agent logs "Worker group FAILED ... will restart worker group" without naming the
    rank; this subclass of its ``LocalElasticAgent`` prints one line per failure first."""
    import torch.distributed.launcher.api as api
    from torch.distributed.elastic.agent.server.api import WorkerState

    base = api.LocalElasticAgent

    class ReportingAgent(base):
        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            if result.state == WorkerState.FAILED and result.failures:
                left = self._remaining_restarts
                then = (f"restarting the group from the last checkpoint ({left} restart(s) left)" if left > 0
                        else "no restarts left: stopping the job")
                print(f"regionspot launch: {describe_failures(result.failures)}; {then}", file=sys.stderr, flush=True)
            return result

    api.LocalElasticAgent = ReportingAgent
    try:
        yield
    finally:
        api.LocalElasticAgent = base


def _set_local_group(world_size: int, per_machine: int, machine_rank: int) -> None:
    """Detectron2's group of the processes on this machine (``comm.get_local_rank``)."""
    if hasattr(comm, "create_local_process_group"):  # newer Detectron2
        comm.create_local_process_group(per_machine)
        return
    for i in range(world_size // per_machine):
        group = dist.new_group(list(range(i * per_machine, (i + 1) * per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def run_in_group(main_func, args=(), timeout: timedelta = DEFAULT_TIMEOUT):
    """``main_func(*args)`` in a process started by torchrun or the elastic agent: join the
    group (``env://``, NCCL with CUDA, gloo without), take the device of ``LOCAL_RANK``, set
    Detectron2's local group, run, then leave the group cleanly. A job of one process runs
    without a group."""
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size <= 1:
        return main_func(*args)
    local_rank = int(os.environ["LOCAL_RANK"])
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    # env:// through the launcher's store, under a prefix of this start: the elastic agent keeps
    # its store across restarts, and a restarted gloo group must not read the dead group's
    # addresses (it would wait to connect to them)
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"regionspot/start_{restart_count()}", store)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timeout)
    _set_local_group(world_size, per_machine, int(os.environ.get("GROUP_RANK", dist.get_rank() // per_machine)))
    comm.synchronize()
    try:
        return main_func(*args)
    finally:
        # Release Detectron2's cached gloo group before the process group: otherwise the
        # process can abort at exit ("terminate called without an active exception").
        cached = getattr(comm, "_get_global_gloo_group", None)
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()
        if hasattr(comm, "_LOCAL_PROCESS_GROUP"):
            comm._LOCAL_PROCESS_GROUP = None
        dist.destroy_process_group()


def _elastic_entry(main_func, args, timeout):
    run_in_group(main_func, args, timeout)  # nothing is sent back to the agent


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
