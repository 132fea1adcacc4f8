"""train_net.py under PyTorch's elastic agent: torchrun (one machine, two "machines" with a c10d
rendezvous), ``--num-gpus`` through ``elastic_launch``, a rank killed with and without
``--max-restarts``, and one job per output folder. CPU, gloo, two processes, the tiny random
models; every command is the real entry point in a subprocess."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from regionspot.engine.launch import _free_port
from regionspot.engine.output_lock import LOCK_NAME, lock_output_dir, release_output_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_GUARD = 600  # seconds; only against a hang, never a timing assertion


def _opts(out, sam_path, clip_path, max_iter, *extra):
    return ["--config-file", "configs/regionspot_sample_cpu.yaml",
            "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", os.path.join(os.path.dirname(out), "text_cache"), "OUTPUT_DIR", out,
            "SOLVER.MAX_ITER", str(max_iter), "SOLVER.IMS_PER_BATCH", "4", "DATASETS.TEST", "()", *extra]


def _env(tmp_path):
    return dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _training_starts(out):
    """The iteration each training run in ``out`` started from, by rank 0's log (Detectron2's
    "Starting training from iteration N"; one line per run that wrote into the folder)."""
    with open(os.path.join(out, "log.txt")) as f:
        return [int(line.rsplit(" ", 1)[1]) for line in f if "Starting training from iteration" in line]


def _final_iteration(out):
    return torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["iteration"]


def test_torchrun_two_processes_train_one_run(tmp_path, sam_path, clip_path):
    """Before: each torchrun process ran its own one-process job into the same folder."""
    out = str(tmp_path / "run")
    cmd = _torchrun("--standalone", "--nproc-per-node", "2", "train_net.py",
                    *_opts(out, sam_path, clip_path, 4, "SOLVER.CHECKPOINT_PERIOD", "2"))
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Rank of current process: 0. World size: 2" in open(os.path.join(out, "log.txt")).read()
    assert "Rank of current process: 1. World size: 2" in open(os.path.join(out, "log.txt.rank1")).read()
    assert proc.stdout.count("trainable head parameters") == 1  # the console is rank 0's
    assert _training_starts(out) == [0]  # one run (before: two, each rank 0 of its own job)
    assert _final_iteration(out) == 3


def test_two_nodes_with_c10d_rendezvous(tmp_path, sam_path, clip_path):
    """Two torchrun agents ("machines", one process each) meet at a c10d rendezvous on loopback."""
    out = str(tmp_path / "run")
    port = _free_port()
    procs = [subprocess.Popen(_torchrun("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
                                        "train_net.py", *_opts(out, sam_path, clip_path, 3)),
                              cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=HANG_GUARD)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "World size: 2" in open(os.path.join(out, "log.txt")).read()
    assert _training_starts(out) == [0]
    assert _final_iteration(out) == 2


def _start_and_kill_rank0(tmp_path, out, cmd, after_checkpoint):
    """Start ``cmd``; once ``after_checkpoint`` exists, SIGKILL rank 0 (its pid is in the lock
    file, which names the job holding the folder). Returns (process, killed pid)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + HANG_GUARD
    while not os.path.exists(os.path.join(out, after_checkpoint)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    with open(os.path.join(out, LOCK_NAME)) as f:
        pid = int(f.read().split("pid ")[1].split(",")[0])
    os.kill(pid, signal.SIGKILL)
    return proc, pid


def test_killed_rank_is_restarted_and_the_run_finishes(tmp_path, sam_path, clip_path):
    """``--max-restarts 1``: the agent restarts the group, which resumes from the last complete
    checkpoint without ``--resume`` and ends at the configured iteration."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "train_net.py", "--num-gpus", "2", "--max-restarts", "1",
           *_opts(out, sam_path, clip_path, 25, "SOLVER.CHECKPOINT_PERIOD", "5")]
    proc, pid = _start_and_kill_rank0(tmp_path, out, cmd, "model_0000004.pth")
    stdout, stderr = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert f"rank 0 (pid {pid}) was killed by signal SIGKILL" in stderr
    assert "restarting the group from the last checkpoint" in stderr
    resumed = [line for line in (stdout + stderr).splitlines() if "elastic restart 1: resuming from iteration" in line]
    assert resumed, stdout[-3000:]
    start = int(resumed[0].split("resuming from iteration ")[1].split()[0])
    assert start >= 5 and start % 5 == 0  # after a complete checkpoint, not from 0
    assert _training_starts(out) == [0, start]
    assert _final_iteration(out) == 24


def test_killed_rank_without_restarts_ends_the_job_naming_it(tmp_path, sam_path, clip_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "train_net.py", "--num-gpus", "2",
           *_opts(out, sam_path, clip_path, 400, "SOLVER.CHECKPOINT_PERIOD", "2")]
    proc, pid = _start_and_kill_rank0(tmp_path, out, cmd, "model_0000001.pth")
    stdout, stderr = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 128 + signal.SIGKILL
    assert f"train_net.py: error: rank 0 (pid {pid}) was killed by signal SIGKILL" in stderr.splitlines(), \
        stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    assert torch.load(os.path.join(out, "model_0000001.pth"), weights_only=True)["iteration"] == 1


def test_second_job_on_a_held_folder_is_refused(tmp_path, sam_path, clip_path):
    out = str(tmp_path / "run")
    lock_output_dir(out)  # this test process plays the running job
    try:
        proc = subprocess.run([sys.executable, "train_net.py", *_opts(out, sam_path, clip_path, 2)], cwd=REPO,
                              env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD)
    finally:
        release_output_dir(out)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "is in use by a running job" in lines[-1] and f"pid {os.getpid()}" in lines[-1]
    assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing of the refused job written



def test_evaluation_under_torchrun_equals_one_process(tmp_path, sam_path, clip_path, head_path):
    """``--eval-only`` with two torchrun processes shards the images and gives one process's AP."""
    aps = []
    for name, launcher in (("one", [sys.executable]), ("two", _torchrun("--standalone", "--nproc-per-node", "2"))):
        out = str(tmp_path / name)
        opts = _opts(out, sam_path, clip_path, 1)
        opts = opts[:opts.index("DATASETS.TEST")]  # the sample's test set
        proc = subprocess.run([*launcher, "train_net.py", "--eval-only", *opts, "MODEL.WEIGHTS", head_path], cwd=REPO,
                              env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (folder,) = os.listdir(os.path.join(out, "inference"))
        with open(os.path.join(out, "inference", folder, "metrics.json")) as f:
            aps.append(json.load(f)["results"]["bbox"])
    assert "World size: 2" in open(os.path.join(str(tmp_path / "two"), "log.txt")).read()
    # the same images through the same model, one thread per process either way: equal up to the
    # scores' float rounding, which could reorder a near-tie (a lost or doubled image moves AP by points)
    assert aps[0].keys() == aps[1].keys()
    for key, value in aps[0].items():
        assert (aps[1][key] is None) if value is None else aps[1][key] == pytest.approx(value, abs=0.05), key
