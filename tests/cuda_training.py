"""Helper of tests/test_cuda.py (not collected by pytest): train_net's trainer on CUDA with a hook
that records, after every step, the total loss, whether every gradient of the head is finite,
the GradScaler's scale (float16 AMP) and the wrapper type; ``--ddp`` runs the same job as one
NCCL process with the model in ``DistributedDataParallel`` (the multi-GPU path, on one GPU).

    python tests/cuda_training.py --out steps.json [--ddp] -- <train_net.py arguments>
"""

import argparse
import json
import math
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "projects", "RegionSpot"))

from detectron2.engine import HookBase  # noqa: E402

import train_net  # noqa: E402


class Watch(HookBase):
    """Per step: iteration, total loss, head gradients all finite, scaler scale, wrapper type."""

    def __init__(self):
        self.steps = []

    def after_step(self):
        model = self.trainer.model
        head = model.module.head if hasattr(model, "module") else model.head
        grads = [p.grad for p in head.parameters() if p.requires_grad and p.grad is not None]
        scaler = getattr(self.trainer._trainer, "scaler", None)
        loss = float(self.trainer.storage.history("total_loss").latest())
        self.steps.append({
            "iter": int(self.trainer.iter), "loss": loss if math.isfinite(loss) else str(loss),
            "grads": len(grads), "grads_finite": bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads),
            "scale": float(scaler.get_scale()) if scaler is not None else None, "wrapper": type(model).__name__,
            "head_device": str(next(head.parameters()).device),
        })


def force_one_process_ddp() -> None:
    """An NCCL process group of one and ``DistributedDataParallel`` around the model (the
    project's ``wrap_ddp`` leaves a single process unwrapped)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from regionspot.engine import launch
    from regionspot.engine import trainer as trainer_module

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{launch._free_port()}", world_size=1, rank=0)
    launch._set_local_group(1, 1, 0)
    torch.cuda.set_device(0)
    trainer_module.wrap_ddp = lambda model, **kwargs: DistributedDataParallel(model, device_ids=[0], **kwargs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    ours = parser.parse_args()
    rest = ours.rest[1:] if ours.rest[:1] == ["--"] else ours.rest
    if ours.ddp:
        force_one_process_ddp()
    args = train_net.get_parser().parse_args(rest)
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    watch = Watch()
    trainer.register_hooks([watch])
    trainer.resume_or_load(resume=args.resume)
    trainer.train()
    with open(ours.out, "w") as f:
        json.dump({"steps": watch.steps, "start_iter": trainer.start_iter, "max_iter": trainer.max_iter}, f)
    if ours.ddp:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
