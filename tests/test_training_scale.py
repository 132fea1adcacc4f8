"""Training at scale, on the bundled sample split into two pretend datasets with different
vocabularies: mixed-dataset batches, the resumable sampler, DDP on the CPU, mixed precision,
kill -9 and --resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.structures import Boxes, Instances

import train_net
from conftest import REPO, build_tiny_model
from regionspot.data.datasets.regionspot_sample import prepare_regionspot_sample
from regionspot.data.samplers import ResumableBatchSampler
from regionspot.modeling.head import region_logits
from regionspot.modeling.losses import region_focal_losses


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """The sample's first 4 images as 'pretend_a', the other 4 as 'pretend_b', each with only
    the categories it annotates (so the two vocabularies differ)."""
    root = tmp_path_factory.mktemp("pretend")
    json_path, image_root = prepare_regionspot_sample(str(root / "sample"))
    data = json.load(open(json_path))
    files = {}
    for name, ids in (("pretend_a", {1, 2, 3, 4}), ("pretend_b", {5, 6, 7, 8})):
        annotations = [a for a in data["annotations"] if a["image_id"] in ids]
        used = {a["category_id"] for a in annotations}
        part = {"images": [{k: v for k, v in im.items() if k != "coco_url"}
                           for im in data["images"] if im["id"] in ids],
                "annotations": annotations,
                "categories": [{"id": c["id"], "name": c["name"]} for c in data["categories"] if c["id"] in used]}
        files[name] = str(root / f"{name}.json")
        json.dump(part, open(files[name], "w"))
    return files, image_root


def _argv(out, sam_path, clip_path, two_datasets, *extra):
    files, image_root = two_datasets
    return ["--config-file", os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"),
            "--register", "pretend_a", files["pretend_a"], image_root,
            "--register", "pretend_b", files["pretend_b"], image_root,
            "MODEL.REGIONSPOT.SAM_WEIGHTS", sam_path, "MODEL.REGIONSPOT.CLIP_WEIGHTS", clip_path,
            "MODEL.REGIONSPOT.TEXT_CACHE_DIR", os.path.join(out, "cache"), "OUTPUT_DIR", out,
            "DATASETS.TRAIN", "('pretend_a', 'pretend_b')", "DATASETS.TEST", "()",
            "DATALOADER.DATASET_RATIO", "[1.0, 3.0]",
            "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "2", *extra]


# every test forgets the datasets it registered (conftest.forget_new_datasets)
pytestmark = pytest.mark.usefixtures("forget_new_datasets")


# ----------------------------------------------------------------------------- sampler
def test_the_sampler_resumes_exactly_and_mixes_by_ratio():
    full = ResumableBatchSampler([6, 30], [1.0, 1.0], batch_per_rank=4, seed=3)
    stream = [b for b, _ in zip(iter(full), range(40))]
    resumed = ResumableBatchSampler([6, 30], [1.0, 1.0], batch_per_rank=4, seed=3, start_iter=17)
    assert [b for b, _ in zip(iter(resumed), range(23))] == stream[17:]
    drawn = torch.tensor(sum(stream, []))
    share_small = (drawn < 6).float().mean().item()
    assert 0.35 < share_small < 0.65  # ratio 1:1 although the first dataset is 5x smaller
    # two ranks: disjoint halves of each global batch, together the single-process stream
    ranks = [ResumableBatchSampler([10], batch_per_rank=2, rank=r, world_size=2, seed=0) for r in (0, 1)]
    single = ResumableBatchSampler([10], batch_per_rank=4, seed=0)
    for (a, b, s), _ in zip(zip(*map(iter, ranks), iter(single)), range(6)):
        assert a + b == s
    # one dataset: every epoch is a permutation (no image twice before all were seen)
    epoch = sum([b for b, _ in zip(iter(ResumableBatchSampler([12], batch_per_rank=3, seed=1)), range(4))], [])
    assert sorted(epoch) == list(range(12))


# ----------------------------------------------------------------------------- mixed batches
def test_each_image_is_scored_against_its_own_datasets_vocabulary(tiny_cfg):
    model = build_tiny_model(tiny_cfg).train()
    g = torch.Generator().manual_seed(0)
    vocab_a = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    vocab_b = torch.nn.functional.normalize(torch.randn(5, 32, generator=g), dim=-1)
    model.set_vocabulary(["a0", "a1", "a2"], vocab_a, dataset="A")
    model.set_vocabulary(["b0", "b1", "b2", "b3", "b4"], vocab_b, dataset="B")

    def item(dataset, labels, seed):
        instances = Instances((120, 160))
        instances.gt_boxes = Boxes(torch.tensor([[10.0, 10, 80, 90], [50, 20, 150, 110]][:len(labels)]))
        instances.gt_classes = torch.tensor(labels)
        image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        return {"image": image, "instances": instances, "dataset": dataset, "file_name": f"{dataset}{seed}.png"}

    batch = [item("A", [2, 0], 1), item("B", [4], 2)]
    torch.manual_seed(0)
    loss = model(batch)["loss_region_focal"]
    # the same by hand: image 0 against A's 3 classes, image 1 against B's 5
    images = [x["image"] for x in batch]
    tokens = model.localizer.training_tokens(batch, images)
    semantic = model.semantic_encoder.encode(images)
    torch.manual_seed(0)
    emb = model.head.embed_regions(tokens, semantic)
    negative_classes = model.criterion.negative_classes
    per_region = torch.cat([
        region_focal_losses(region_logits(emb[0], vocab_a), torch.tensor([2, 0]), 0.25, 2.0, negative_classes),
        region_focal_losses(region_logits(emb[1], vocab_b), torch.tensor([4]), 0.25, 2.0, negative_classes)])
    torch.testing.assert_close(loss, per_region.mean())
    with pytest.raises(ValueError, match="labels must lie in"):
        model([item("A", [4], 3)])  # a label of B's vocabulary is out of A's


def test_noisy_negatives_can_be_left_out(tiny_cfg):
    model = build_tiny_model(tiny_cfg)
    model.criterion.ignore_unverified_negatives = model.criterion.ignore_ancestor_negatives = True
    from regionspot.modeling.text_classifier import Vocabulary

    vocabulary = Vocabulary(["animal", "dog", "cat", "car"], torch.zeros(4, 32), ancestors={1: [0], 2: [0]})
    labels = torch.tensor([1, 3])
    ignore = model.criterion.ignored_negatives({"image_level_labels": [2]}, labels, vocabulary)
    # verified: the labels (1, 3) and 2; unverified: 0 ("animal"); ancestors of dog: animal
    assert ignore.tolist() == [[True, False, False, False], [True, False, False, False]]
    assert model.criterion.ignored_negatives({}, labels, Vocabulary(["a", "b", "c", "d"], torch.zeros(4, 32))) is None
    losses_all = region_focal_losses(torch.zeros(2, 4), labels)
    losses_ignored = region_focal_losses(torch.zeros(2, 4), labels, ignore=ignore)
    torch.testing.assert_close(losses_all, losses_ignored)  # equal logits: the per-class weight adapts


# ----------------------------------------------------------------------------- trainer
def test_training_two_datasets_and_resuming_continues_the_data_order(tmp_path, sam_path, clip_path, two_datasets,
                                                                     monkeypatch):
    monkeypatch.chdir(REPO)
    out = str(tmp_path / "run")
    argv = _argv(out, sam_path, clip_path, two_datasets, "SOLVER.MAX_ITER", "4")
    train_net.main(train_net.get_parser().parse_args(argv))
    assert torch.load(os.path.join(out, "model_final.pth"), weights_only=False)["iteration"] == 3
    args = train_net.get_parser().parse_args(_argv(out, sam_path, clip_path, two_datasets, "SOLVER.MAX_ITER", "8") +
                                             ["--resume"])
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4 and trainer.train_sampler.start_iter == 4
    assert set(trainer.model.vocabularies.by_dataset) == {"pretend_a", "pretend_b"}
    assert len(trainer.model.vocabularies.by_dataset["pretend_a"].names) != len(
        trainer.model.vocabularies.by_dataset["pretend_b"].names)
    expected = next(iter(ResumableBatchSampler(trainer.train_sampler.sizes, [1.0, 3.0], batch_per_rank=4,
                                               seed=trainer.train_sampler.seed, start_iter=4)))
    dicts = trainer._trainer.data_loader.dataset._dataset
    first = next(trainer._trainer._data_loader_iter)
    assert [x["image_id"] for x in first] == [dicts[i]["image_id"] for i in expected]
    assert {x["dataset"] for x in first} <= {"pretend_a", "pretend_b"}


@pytest.mark.skipif(not hasattr(torch, "autocast"), reason="needs torch.autocast")
def test_bfloat16_mixed_precision_training_on_the_cpu(tmp_path, sam_path, clip_path, two_datasets, monkeypatch,
                                                      caplog):

    monkeypatch.chdir(REPO)
    out = str(tmp_path / "amp")
    argv = _argv(out, sam_path, clip_path, two_datasets, "SOLVER.MAX_ITER", "3", "SOLVER.AMP.ENABLED", "True",
                 "SOLVER.AMP.PRECISION", "bfloat16")
    train_net.main(train_net.get_parser().parse_args(argv))
    # the progress lines a person reads, in the run's log file
    progress = [line for line in open(os.path.join(out, "log.txt")) if "regionspot.train" in line]
    assert progress and all(k in progress[-1] for k in ("iter 3/3", "it/s", "images/s", "ETA", "total_loss"))
    losses = [json.loads(line)["total_loss"] for line in open(os.path.join(out, "metrics.json"))
              if "total_loss" in line]
    assert losses and all(loss == loss and loss > 0 for loss in losses)  # finite, not NaN
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="float16 needs a CUDA device"):
            argv = _argv(str(tmp_path / "fp16"), sam_path, clip_path, two_datasets, "SOLVER.MAX_ITER", "1",
                         "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "float16")
            train_net.main(train_net.get_parser().parse_args(argv))


def test_two_processes_hold_identical_parameters_after_every_step(tmp_path, sam_path, clip_path, two_datasets):
    """Two gloo processes on the CPU; a hook compares the head's parameters across ranks each step."""
    out = str(tmp_path / "ddp")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_agreement.py")
    cmd = [sys.executable, script, "--num-gpus", "2"] + _argv(out, sam_path, clip_path, two_datasets,
                                                             "SOLVER.MAX_ITER", "3")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    agreement = json.load(open(os.path.join(out, "agreement.json")))
    assert agreement["steps"] == 3 and agreement["world_size"] == 2 and agreement["all_equal"]
    assert len(set(agreement["checksums"])) == 3  # the parameters did change between steps


def test_kill_9_then_resume_continues_from_the_last_checkpoint(tmp_path, sam_path, clip_path, two_datasets):
    out = str(tmp_path / "killed")
    cmd = [sys.executable, "train_net.py"] + _argv(out, sam_path, clip_path, two_datasets, "SOLVER.MAX_ITER", "400")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not os.path.exists(os.path.join(out, "model_0000005.pth")) and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("training stopped before the first checkpoints")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = open(os.path.join(out, "last_checkpoint")).read().strip()
    done = torch.load(os.path.join(out, last), weights_only=False)["iteration"]
    assert done >= 5 and not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic checkpoints only
    resumed = subprocess.run(cmd[:-2] + ["SOLVER.MAX_ITER", str(done + 3), "--resume"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    iterations = [json.loads(line)["iteration"] for line in open(os.path.join(out, "metrics.json"))
                  if "total_loss" in line]
    assert iterations[-1] == done + 2  # continued from the checkpoint to the new end
    assert torch.load(os.path.join(out, "model_final.pth"), weights_only=False)["iteration"] == done + 2


# ----------------------------------------------------------------------------- SAM-token cache
def _extract(tmp_path, sam_path, clip_path, two_datasets, dataset, sam=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract_tool_train",
                                                  os.path.join(REPO, "tools", "extract_sam_tokens.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    files, image_root = two_datasets
    cache = str(tmp_path / "tokens")
    code = tool.main(["--config-file", os.path.join(REPO, "configs", "regionspot_sample_cpu.yaml"),
                      "--dataset", dataset, "--output-dir", cache, "--num-workers", "0",
                      "--register", dataset, files[dataset], image_root,
                      "--opts", "MODEL.REGIONSPOT.SAM_WEIGHTS", sam or sam_path])
    assert code == 0
    return cache


def test_training_tokens_are_float32_whatever_the_encoder_precision():
    """The SAM-token cache holds float32 tokens; online training must compute the same, even
    when the encoders run at a lower precision for inference (float16 on CUDA by default,
    bfloat16 here on the CPU): the localizer's one extraction ignores ENCODER_PRECISION."""
    from regionspot.testing.random_backbones import random_regionspot

    full = random_regionspot("small", seed=3, encoder_precision="float32").localizer
    low = random_regionspot("small", seed=3, encoder_precision="bfloat16").localizer
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=g)
    instances = Instances((60, 80), gt_boxes=Boxes(torch.tensor([[4.0, 5.0, 40.0, 50.0], [30.0, 2.0, 79.0, 33.0]])))
    batch = [{"image": image, "instances": instances}]
    with torch.no_grad():
        reference = full.training_tokens(batch, [image])[0]
        tokens = low.training_tokens(batch, [image])[0]
        # the inference side does follow the setting: its embedding was computed in bfloat16
        low_embedding, full_embedding = low.encode([image])[0], full.encode([image])[0]
    assert tokens.dtype == torch.float32 and torch.equal(tokens, reference)
    assert not torch.equal(low_embedding, full_embedding)
    torch.testing.assert_close(low_embedding.float(), full_embedding, rtol=0.1, atol=0.1)


def test_cached_tokens_equal_the_online_ones_through_the_mapper_and_model(tmp_path, tiny_cfg, sam_path, clip_path,
                                                                          two_datasets):
    """The training mapper with the cache and the model's online SAM give the same tokens, image and flip."""
    from regionspot.data.datasets.user import load_dataset_json
    from regionspot.data.mapper import RegionSpotDatasetMapper

    cache = _extract(tmp_path, sam_path, clip_path, two_datasets, "pretend_a")
    files, image_root = two_datasets
    record = dict(load_dataset_json(files["pretend_a"], image_root)[0], dataset="pretend_a")
    model = build_tiny_model(tiny_cfg)
    for flip in (False, True):
        cfg = tiny_cfg.clone()
        cfg.defrost()
        cfg.INPUT.RANDOM_FLIP = "horizontal"
        online = RegionSpotDatasetMapper(cfg, True)
        cfg.MODEL.REGIONSPOT.TOKEN_CACHE_DIR = cache
        cached = RegionSpotDatasetMapper(cfg, True)
        for mapper in (online, cached):
            mapper.augmentations.augs[-1].prob = 1.0 if flip else 0.0
        a, b = online(dict(record)), cached(dict(record))
        assert "sam_image" in a and not b["instances"].has("sam_boxes")
        online_tokens = model.localizer.training_tokens([a], [a["image"]])[0]
        torch.testing.assert_close(b["instances"].sam_tokens, online_tokens, rtol=0, atol=1e-5)
        again = model.localizer.training_tokens([online(dict(record))], [a["image"]])[0]
        assert (online_tokens - again).abs().max() == 0


def test_training_reads_the_cache_and_refuses_a_foreign_one(tmp_path, sam_path, clip_path, two_datasets, monkeypatch):
    from regionspot.data.token_cache import TokenCacheError
    from regionspot.testing.random_backbones import write_random_sam

    monkeypatch.chdir(REPO)
    cache = _extract(tmp_path, sam_path, clip_path, two_datasets, "pretend_a")
    _extract(tmp_path, sam_path, clip_path, two_datasets, "pretend_b")
    out = str(tmp_path / "cached_run")
    argv = _argv(out, sam_path, clip_path, two_datasets, "SOLVER.MAX_ITER", "2",
                 "MODEL.REGIONSPOT.TOKEN_CACHE_DIR", cache)
    calls = []
    from regionspot.modeling.position_tokens import SamPositionTokens

    original = SamPositionTokens.encode_images
    monkeypatch.setattr(SamPositionTokens, "encode_images", lambda *a: calls.append(1) or original(*a))
    train_net.main(train_net.get_parser().parse_args(argv + ["DATALOADER.NUM_WORKERS", "0"]))
    assert calls == []  # SAM's image encoder never ran: only CLIP and the head
    other_sam = write_random_sam(str(tmp_path / "other_sam.pth"), "tiny", seed=7)
    argv = _argv(str(tmp_path / "foreign"), other_sam, clip_path, two_datasets, "SOLVER.MAX_ITER", "1",
                 "MODEL.REGIONSPOT.TOKEN_CACHE_DIR", cache, "DATALOADER.NUM_WORKERS", "0")
    with pytest.raises(TokenCacheError, match="pretend_a"):
        train_net.main(train_net.get_parser().parse_args(argv))


def test_classes_with_the_same_text_are_never_each_others_negatives(tiny_cfg):
    """V3Det has 45 case-only twins ("Timer", "timer"): a dataset vocabulary keeps them, with a
    warning, and training does not count a region's twin class as a negative."""
    model = build_tiny_model(tiny_cfg)
    with pytest.raises(ValueError, match="duplicate"):
        model.set_vocabulary(["Timer", "clock", "timer"], dataset="v3det_like")
    model.set_vocabulary(["Timer", "clock", "timer"], dataset="v3det_like", allow_duplicates=True)
    vocabulary = model.vocabularies.by_dataset["v3det_like"]
    assert vocabulary.aliases == {0: [2], 2: [0]}
    assert torch.equal(vocabulary.text_embeddings[0], vocabulary.text_embeddings[2])
    ignore = model.criterion.ignored_negatives({}, torch.tensor([2, 1]), vocabulary)
    assert ignore.tolist() == [[True, False, False], [False, False, False]]


def test_bad_training_data_is_named_or_counted(tmp_path, caplog):
    """A category id not in the categories: an error naming the annotation; zero/negative boxes:
    skipped and counted (a missing image file is skipped in training, see test_mapper.py; a
    token cache from other SAM weights is refused, see test_training_reads_the_cache...)."""
    import logging

    from regionspot.data.datasets.user import load_dataset_json
    from regionspot.data.validation import InputError

    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
            "categories": [{"id": 3, "name": "cat"}],
            "annotations": [{"id": 11, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 5]},
                            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, -2]},
                            {"id": 13, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4]}]}
    (tmp_path / "d.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        records = load_dataset_json(str(tmp_path / "d.json"), str(tmp_path))
    assert len(records[0]["annotations"]) == 1
    assert "2 annotation(s) with zero or negative width/height skipped (ids [11, 12])" in caplog.text
    data["annotations"].append({"id": 14, "image_id": 1, "category_id": 9, "bbox": [1, 1, 4, 4]})
    (tmp_path / "d.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="d.json: annotation 14 has category_id 9, which is not in 'categories'"):
        load_dataset_json(str(tmp_path / "d.json"), str(tmp_path))


def test_periodic_evaluation_during_training_keeps_the_training_vocabularies(tmp_path, sam_path, clip_path,
                                                                            two_datasets, monkeypatch):
    monkeypatch.chdir(REPO)
    files, image_root = two_datasets
    out = str(tmp_path / "eval_period")
    argv = _argv(out, sam_path, clip_path, two_datasets, "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "2",
                 "DATASETS.TEST", "('pretend_b',)")
    args = train_net.get_parser().parse_args(argv)
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    before = {k: v.text_embeddings.clone() for k, v in trainer.model.vocabularies.by_dataset.items()}
    trainer.train()
    assert os.path.exists(os.path.join(out, "inference", "pretend_b", "metrics.json"))
    assert trainer.model.class_names == trainer.model.vocabularies.by_dataset["pretend_a"].names  # restored
    assert all(torch.equal(before[k], v.text_embeddings) for k, v in trainer.model.vocabularies.by_dataset.items())
