"""Helper of tests/test_training_scale.py (not collected by pytest): train_net's main with a
hook that checks, after every step, that all ranks hold identical head parameters."""

import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "projects", "RegionSpot"))

from detectron2.engine import HookBase  # noqa: E402
from detectron2.utils import comm  # noqa: E402

import train_net  # noqa: E402


class Agreement(HookBase):
    def __init__(self):
        self.checksums, self.all_equal = [], True

    def after_step(self):
        head = self.trainer.model.module.head if hasattr(self.trainer.model, "module") else self.trainer.model.head
        flat = torch.cat([p.detach().flatten().double() for p in head.parameters()])
        value = float(flat.sum() + (flat * torch.arange(flat.numel(), dtype=torch.float64)).sum() * 1e-6)
        everyone = comm.all_gather(value)
        self.all_equal &= all(v == everyone[0] for v in everyone)
        self.checksums.append(value)


def main(args):
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    hook = Agreement()
    trainer.register_hooks([hook])
    trainer.resume_or_load(resume=False)
    trainer.train()
    if comm.is_main_process():
        json.dump({"steps": len(hook.checksums), "world_size": comm.get_world_size(), "all_equal": hook.all_equal,
                   "checksums": hook.checksums}, open(os.path.join(cfg.OUTPUT_DIR, "agreement.json"), "w"))


if __name__ == "__main__":
    args = train_net.get_parser().parse_args()
    train_net.launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                     dist_url=args.dist_url, args=(args,))
