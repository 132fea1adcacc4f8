"""The README's first command, end to end: random official-format backbones, LVIS AP before
training, training, LVIS AP after, demo. The head must learn the sample."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_job_on_the_sample(tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "run_sample.py"), "--output",
                           str(tmp_path / "out")], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "RANDOMLY INITIALISED" in out and "says nothing about RegionSpot's accuracy" in out
    assert "training loss (sigmoid focal)" in out and "OK: the head learned" in out
    before = json.load(open(tmp_path / "out/eval_untrained/inference/regionspot_sample/metrics.json"))
    after = json.load(open(tmp_path / "out/eval_trained/inference/regionspot_sample/metrics.json"))
    assert after["results"]["bbox"]["AP"] > before["results"]["bbox"]["AP"] + 10
    for key in ("APr", "APc", "APf"):
        assert key in after["results"]["bbox"]
    losses = [json.loads(line)["total_loss"] for line in open(tmp_path / "out/train/metrics.json")
              if "total_loss" in line]
    assert losses[-1] < 0.5 * losses[0]
    # the detector-style proposal file, and the Table-1 summary of both sources
    detector = json.load(open(tmp_path / "out/eval_trained_detector/inference/regionspot_sample/metrics.json"))
    assert detector["proposals"] == "file" and detector["proposal_coverage"]["images_without_proposals"] == 0
    assert 0 < detector["results"]["bbox"]["AP"] < after["results"]["bbox"]["AP"]  # imperfect boxes cost AP
    assert "Table-1 layout" in out and "simulated detector (file)" in out and "Protocol" in out
    table = (tmp_path / "out/summary/table1.md").read_text()
    assert "GT boxes" in table and "simulated detector (file)" in table and "not RegionSpot's accuracy" in table
    assert (tmp_path / "out/summary/table1.png").stat().st_size > 5_000
    demo = json.load(open(tmp_path / "out/demo/astronaut.json"))
    assert len(demo["predictions"]) == 6
    assert (tmp_path / "out/demo/astronaut.jpg").stat().st_size > 10_000
    assert (tmp_path / "datasets/regionspot_sample/images/astronaut.png").exists()
