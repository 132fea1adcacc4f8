"""What a person sees from train_net.py, run as a subprocess: the project's INFO lines and the
training progress on the console and in OUTPUT_DIR/log.txt, once each; input errors as one
line (the traceback with --debug, and in the log file); foreign weights files named for what
they are; an empty head refused for evaluation unless asked for."""

import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml")
PROGRESS = re.compile(r"iter (\d+)/(\d+)\s+[\d.]+ it/s\s+[\d.]+ images/s\s+ETA \d+:\d\d:\d\d")


def _train_net(tmp_path, sam_path, clip_path, *args, timeout=600):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, *args,
           "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
           "MODEL.REGIONSPOT.TEXT_CACHE_DIR", str(tmp_path / "cache")]
    return subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=timeout)


def _error_line(proc) -> str:
    """The one error line that ends a refused run (no traceback on the console)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("train_net.py: error: "), proc.stderr[-2000:]
    return errors[0]


def test_training_and_evaluation_show_progress_and_project_lines(tmp_path, sam_path, clip_path):
    """Progress every 20 iterations (iterations/s, images/s, ETA), the project's lines (head
    size, text embeddings, which head file was loaded, the protocol under the AP table) on
    the console and in log.txt, each once."""
    out = tmp_path / "train"
    proc = _train_net(tmp_path, sam_path, clip_path, "SOLVER.MAX_ITER", "41", "SOLVER.IMS_PER_BATCH", "2",
                      "SOLVER.WARMUP_ITERS", "1", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    for text in (proc.stdout, log):
        progress = [m.groups() for m in PROGRESS.finditer(text)]
        assert progress == [("20", "41"), ("40", "41"), ("41", "41")], text[-3000:]  # every 20, and the last
        assert len(re.findall(r"RegionSpot: \d+ trainable head parameters", text)) == 1
        assert len(re.findall(r"Encod(ing|ed) \d+ (classes|prompts)", text)) == 2  # start and end of text encoding
    weights = str(out / "model_final.pth")
    assert os.path.isfile(weights)

    evaluation = tmp_path / "eval"
    proc = _train_net(tmp_path, sam_path, clip_path, "--eval-only", "MODEL.WEIGHTS", weights,
                      "OUTPUT_DIR", str(evaluation))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (evaluation / "log.txt").read_text()
    for text in (proc.stdout, log):
        assert text.count(f"Loaded the RegionSpot head from {weights}") == 1
        assert text.count("bbox AP on regionspot_sample:") == 1
        assert re.search(r"protocol: .*ground-truth boxes", text)


def test_input_errors_are_one_line_with_the_traceback_on_demand(tmp_path, sam_path, clip_path):
    out = str(tmp_path / "out")
    proc = _train_net(tmp_path, sam_path, clip_path, "--eval-only", "MODEL.REGIONSPOT.PROPOSALS_TOPK", "100",
                      "OUTPUT_DIR", out)
    line = _error_line(proc)
    assert "unknown config key MODEL.REGIONSPOT.PROPOSALS_TOPK on the command line" in line
    assert "did you mean MODEL.REGIONSPOT.PROPOSAL_TOPK" in line
    # a key misspelled in a yaml: the yaml is named
    bad = tmp_path / "mine.yaml"
    bad.write_text(f'_BASE_: "{CONFIG}"\nMODEL:\n  REGIONSPOT:\n    TEST_TOPKK: 3\n')
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", str(bad),
                           "--eval-only"], cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    line = _error_line(proc)
    assert f"unknown config key MODEL.REGIONSPOT.TEST_TOPKK in {bad}" in line
    assert "did you mean MODEL.REGIONSPOT.TEST_TOPK" in line
    # unregistered dataset, with --debug: the traceback too
    proc = _train_net(tmp_path, sam_path, clip_path, "--eval-only", "--debug", "DATASETS.TEST", "('my_photos',)",
                      "OUTPUT_DIR", out)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("train_net.py: error: DATASETS.TEST names 'my_photos'")


def test_an_empty_head_is_refused_for_evaluation_unless_asked_for(tmp_path, sam_path, clip_path):
    out = tmp_path / "out"
    line = _error_line(_train_net(tmp_path, sam_path, clip_path, "--eval-only", "OUTPUT_DIR", str(out)))
    assert "MODEL.WEIGHTS" in line and "--untrained-head" in line
    assert not (out / "inference").exists()
    proc = _train_net(tmp_path, sam_path, clip_path, "--eval-only", "--untrained-head", "SOLVER.IMS_PER_BATCH", "1",
                      "OUTPUT_DIR", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "randomly initialised head" in proc.stdout
    import json

    metrics = json.loads((out / "inference" / "regionspot_sample" / "metrics.json").read_text())
    assert metrics["weights"] == "untrained"


def test_foreign_weights_files_are_named_for_what_they_are(tmp_path, sam_path, clip_path):
    """SAM's file and CLIP's file given as MODEL.WEIGHTS: named, with the key they belong to,
    in one line of reasonable length; the log file keeps the traceback."""
    for path, expected in ((sam_path, "this is SAM's image encoder"), (clip_path, "TorchScript archive")):
        out = tmp_path / os.path.basename(path)
        line = _error_line(_train_net(tmp_path, sam_path, clip_path, "--eval-only", "MODEL.WEIGHTS", path,
                                      "OUTPUT_DIR", str(out)))
        assert expected in line and len(line) < 400
        assert ("MODEL.REGIONSPOT.SAM_WEIGHTS" if path == sam_path else "MODEL.REGIONSPOT.CLIP_WEIGHTS") in line
        log = (out / "log.txt").read_text()
        assert "Traceback" in log and expected in log


@pytest.mark.parametrize("keys, belongs", [
    (["image_encoder.patch_embed.proj.weight", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
      "mask_decoder.iou_token.weight"], "MODEL.REGIONSPOT.SAM_WEIGHTS"),
    (["visual.conv1.weight", "token_embedding.weight", "logit_scale"], "MODEL.REGIONSPOT.CLIP_WEIGHTS"),
    (["backbone.bottom_up.stem.conv1.weight", "proposal_generator.rpn_head.conv.weight",
      "roi_heads.box_predictor.cls_score.weight"], "MODEL.REGIONSPOT.RPN_WEIGHTS"),
])
def test_foreign_state_dicts_are_recognised(tmp_path, tiny_model, keys, belongs):
    """Detectron2's and torch's own layouts of SAM, CLIP and a Detectron2 model-zoo detector,
    loaded through the checkpointer: a one-line message naming the key each belongs to."""
    from regionspot.checkpoint import CheckpointError, RegionSpotCheckpointer

    path = tmp_path / "foreign.pth"
    torch.save({k: torch.zeros(2) for k in keys}, path)
    with pytest.raises(CheckpointError) as error:
        RegionSpotCheckpointer(tiny_model).load(str(path))
    message = str(error.value)
    assert belongs in message and "\n" not in message and len(message) < 400
    # a head of another model keeps the key listing, shortened
    torch.save({"model": {"head.other.weight": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="is not a checkpoint of this RegionSpot head"):
        RegionSpotCheckpointer(tiny_model).load(str(path))
