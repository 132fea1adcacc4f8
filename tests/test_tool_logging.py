"""What a person sees from the tools, run as subprocesses: the project's INFO lines once on the
console and once in the run's log file next to the output; an input error as one line
``<prog>: error: <message>`` with exit status 2 and no traceback (the traceback with --debug,
and in the log file)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

CONFIG = os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml")


def _tool(tmp_path, name, *args):
    """Run ``tools/<name>.py ARGS`` from ``tmp_path``; the completed process (text output)."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{name}.py"), *args], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=120)


def _once(text: str, line: str) -> bool:
    return text.count(line) == 1


def _assert_one_error_line(proc, prog: str, fragment: str) -> str:
    """Exit status 2, no traceback, and exactly one ``<prog>: error:`` line holding ``fragment``."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: ") and fragment in errors[0], proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def sample_proposals(tmp_path_factory):
    """(json, image_root, proposal file): the bundled sample's LVIS json and a COCO results file of
    its ground-truth boxes."""
    from regionspot.data.datasets.regionspot_sample import prepare_regionspot_sample

    root = tmp_path_factory.mktemp("sample")
    json_path, image_root = prepare_regionspot_sample(str(root))
    with open(json_path) as f:
        gt = json.load(f)
    results = [{"image_id": a["image_id"], "bbox": a["bbox"], "score": 1.0, "category_id": a["category_id"]}
               for a in gt["annotations"]]
    proposals = root / "proposals.json"
    proposals.write_text(json.dumps(results))
    return json_path, image_root, str(proposals)


def test_proposals_inspect_logs_once_and_errors_in_one_line(sample_proposals, tmp_path):
    json_path, image_root, proposals = sample_proposals
    report = tmp_path / "out" / "report.json"
    proc = _tool(tmp_path, "proposals", "inspect", proposals, "--register", "mine", json_path, image_root,
                 "--dataset", "mine", "--output", str(report))
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = f"Registered mine: {json_path}"  # the project's INFO line (regionspot.data.datasets.user)
    log = (tmp_path / "out" / "report.json.log").read_text()
    assert _once(proc.stdout, line) and _once(log, line), proc.stdout + log
    assert "class-agnostic recall of 62 ground-truth boxes" in proc.stdout and report.is_file()

    bad = tmp_path / "bad"
    proc = _tool(tmp_path, "proposals", "inspect", proposals, "--dataset", "no_such_dataset", "--output",
                 str(bad / "report.json"))
    _assert_one_error_line(proc, "proposals.py", "dataset 'no_such_dataset' is not registered")
    assert not (bad / "report.json").exists()
    log = (bad / "report.json.log").read_text()
    assert "Traceback" in log and "no_such_dataset" in log  # the traceback stays in the log file

    proc = _tool(tmp_path, "proposals", "inspect", proposals, "--dataset", "no_such_dataset", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("proposals.py: error: dataset 'no_such_dataset'")


def test_dump_text_embeddings_logs_once_and_errors_in_one_line(clip_path, tmp_path):
    out = tmp_path / "emb" / "names.pt"
    opts = ["--opts", "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path, "MODEL.REGIONSPOT.TEXT_CACHE_DIR",
            str(tmp_path / "cache")]
    common = ["--config-file", CONFIG, "--vocabulary", "custom", "--custom-vocabulary", "cat,dog"]
    proc = _tool(tmp_path, "dump_text_embeddings", *common, "--output", str(out), *opts)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "emb" / "names.pt.log").read_text()
    for line in (f"Loaded CLIP from {clip_path}", "Encoded 162 prompts (2 classes)"):
        assert _once(proc.stdout, line) and _once(log, line), proc.stdout + log
    assert "Loaded CLIP" not in proc.stderr  # log lines go to stdout, with the tool's own lines

    # a misspelled config key: one line naming the key and the likely one meant
    proc = _tool(tmp_path, "dump_text_embeddings", *common, *opts, "MODEL.REGIONSPOT.TEXT_BATCH_SIZ", "8")
    line = _assert_one_error_line(proc, "dump_text_embeddings.py", "MODEL.REGIONSPOT.TEXT_BATCH_SIZ")
    assert "MODEL.REGIONSPOT.TEXT_BATCH_SIZE" in line
    # a missing config file, with --debug: the traceback too
    missing = str(tmp_path / "missing.yaml")
    proc = _tool(tmp_path, "dump_text_embeddings", "--config-file", missing, "--vocabulary", "coco", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dump_text_embeddings.py: error: ") and missing in last
