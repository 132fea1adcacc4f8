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


def test_a_write_that_hits_enospc_is_one_error_and_leaves_nothing(tmp_path):
    """ENOSPC in the middle of an atomic write (size unknown): DiskFullError naming the folder,
    the bytes written so far and the bytes free; the previous file stays, no temporary file."""
    import errno

    from regionspot.io import DiskFullError, atomic_write

    path = tmp_path / "results.json"
    path.write_text("previous")

    def write(f):
        f.write(b"x" * 1000)
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as e:
        atomic_write(str(path), write)
    assert str(e.value).startswith(f"no space left in {tmp_path} for results.json: it needs more than the 1000 "
                                   f"bytes written, ")
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["results.json"]


def test_detectron2_evaluator_files_are_written_atomically_and_checked(tmp_path, monkeypatch):
    """What Detectron2's evaluators write through iopath's PathManager (the predictions, the
    results JSON) goes through AtomicFile inside ``atomic_opens``: a full disk is one error
    naming the folder, and no file appears under its name."""
    import json

    from detectron2.utils.file_io import PathManager

    import regionspot.io as rio

    folder = tmp_path / "inference"
    folder.mkdir()
    with rio.atomic_opens(PathManager, str(folder)):
        with PathManager.open(str(folder / "lvis_instances_results.json"), "w") as f:
            json.dump([{"image_id": 1}], f)
        with PathManager.open(str(folder / "instances_predictions.pth"), "wb") as f:
            torch.save([{"image_id": 1}], f)
        monkeypatch.setattr(rio, "free_bytes", lambda folder: 10)
        with pytest.raises(rio.DiskFullError, match=f"no space left in {folder} for big.json: it needs 2"):
            with PathManager.open(str(folder / "big.json"), "w") as f:
                json.dump(["x" * 20], f)
        with pytest.raises(RuntimeError):  # a writer's own error: nothing written
            with PathManager.open(str(folder / "broken.json"), "w") as f:
                f.write("[1,")
                raise RuntimeError("the writer failed")
    monkeypatch.undo()
    assert json.load(open(folder / "lvis_instances_results.json")) == [{"image_id": 1}]
    assert torch.load(folder / "instances_predictions.pth", weights_only=True) == [{"image_id": 1}]
    assert sorted(os.listdir(folder)) == ["instances_predictions.pth", "lvis_instances_results.json"]
    assert "open" not in vars(PathManager)  # PathManager is itself again


def test_metrics_lines_are_not_written_without_room(tmp_path, monkeypatch):
    import regionspot.io as rio

    path = tmp_path / "metrics.json"
    stream = rio.SpaceCheckedStream(open(path, "a"), str(path))
    stream.write('{"iteration": 0}\n')
    monkeypatch.setattr(rio, "free_bytes", lambda folder: 100)
    with pytest.raises(rio.DiskFullError, match=f"no space left in {tmp_path} for metrics.json"):
        stream.write('{"iteration": 1}\n')
    stream.close()
    assert path.read_text() == '{"iteration": 0}\n'
