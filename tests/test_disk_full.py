"""A full disk while training checkpoints and while extracting SAM tokens: the run stops with
one line naming the folder, the bytes needed and the bytes free; no partial file is left under
a final name; ``last_checkpoint`` names a complete checkpoint, which loads; once there is room,
``--resume`` (or a rerun of the extraction) continues to the same result as a clean run.

The small disk: tests/small_disk.py (a tmpfs, or a free-space shim where none can be mounted)."""

import os
import subprocess
import sys

import pytest
import torch

from small_disk import small_disks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    yield from small_disks(tmp_path)


def _no_temporary_files(folder):
    return [f for root, _, files in os.walk(folder) for f in files if f.endswith(".tmp")]


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint_then_resume(tmp_path, small_disk, sam_path,
                                                                              clip_path):
    disk = small_disk(9 * MB)  # the tiny head's checkpoints are ~3.7 MB: room for two
    out = disk.folder
    cmd = [sys.executable, "train_net.py", "--config-file", "configs/regionspot_sample_cpu.yaml",
           "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
           "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "text_cache"), "OUTPUT_DIR", out,
           "SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "()"]
    env = disk.env(DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train_net.py: error: no space left in {os.path.realpath(out)} for model_0000005.pth: "
                           f"it needs "), proc.stderr[-3000:]
    assert "bytes are free" in last and "Traceback" not in proc.stderr
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000003.pth"
    assert not os.path.exists(os.path.join(out, "model_0000005.pth")) and not _no_temporary_files(out)
    assert torch.load(os.path.join(out, "model_0000003.pth"), weights_only=True)["iteration"] == 3

    disk.resize(24 * MB)
    proc = subprocess.run(cmd + ["--resume"], cwd=REPO, env=disk.env(DETECTRON2_DATASETS=env["DETECTRON2_DATASETS"]),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Starting training from iteration 4" in open(os.path.join(out, "log.txt")).read()
    assert torch.load(os.path.join(out, "model_final.pth"), weights_only=True)["iteration"] == 5
