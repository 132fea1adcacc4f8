"""The training sampler: several datasets mixed by ratio, deterministic, and resumable.

One global stream of image indices per run, cut into epochs: epoch ``e`` draws its order from
a generator seeded with ``seed + e``. With one dataset (or ratios proportional to the dataset
sizes) an epoch is a permutation of all images; otherwise it is ``sum(sizes)`` draws with
replacement in which dataset ``d`` has probability ``ratio_d / sum(ratios)`` (the mixing
Detic uses for several detection datasets). Global batch ``k`` is the stream's items
``[k * B, (k + 1) * B)`` with ``B = batch_per_rank * world_size``; rank ``r`` takes its
``batch_per_rank`` consecutive items of it.

Resuming from iteration ``i`` starts the stream at item ``i * B``: a run killed and restarted
with ``--resume`` sees exactly the images an uninterrupted run would have seen next, and none
of those it had already seen in that epoch. (Augmentation randomness, drawn in the data-loader
workers, is not replayed.) Batches are handed to ``torch.utils.data.DataLoader`` as a
``batch_sampler``, so every worker receives whole batches and the loader yields them in order.
"""

from typing import Iterator, List, Sequence

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler):
    """Infinite batches of dataset indices for one rank (see the module docstring).

    Args:
        sizes: images per dataset, in the order their dicts are concatenated.
        ratios: sampling weight per dataset (None: every image equally likely).
        batch_per_rank: images per batch on this rank.
        rank, world_size: this process and the number of processes.
        seed: the run's seed (``SEED``; a random one when negative).
        start_iter: the iteration to start from (set after ``--resume`` with
            :meth:`set_start_iter`).

    Raises:
        ValueError: empty datasets, ratios of another length or not positive.
    """

    def __init__(self, sizes: Sequence[int], ratios: Sequence[float] = None, *, batch_per_rank: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, start_iter: int = 0):
        sizes = [int(s) for s in sizes]
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"every training dataset needs at least one image, got sizes {sizes}")
        if ratios is not None and (len(ratios) != len(sizes) or min(ratios) <= 0):
            raise ValueError(f"DATALOADER.DATASET_RATIO needs one positive ratio per training dataset "
                             f"({len(sizes)}), got {list(ratios)}")
        if batch_per_rank <= 0:
            raise ValueError(f"the batch per process must be positive, got {batch_per_rank}")
        self.sizes = sizes
        self.total = sum(sizes)
        self.batch_per_rank, self.rank, self.world_size = batch_per_rank, rank, world_size
        self.seed = seed if seed >= 0 else int(torch.randint(0, 2 ** 31 - 1, ()).item())
        self.start_iter = start_iter
        self.weights = None
        if ratios is not None and len(sizes) > 1:
            per_image = torch.cat([torch.full((n,), float(r) / n, dtype=torch.float64) for n, r in zip(sizes, ratios)])
            if not torch.allclose(per_image, per_image[:1].expand_as(per_image)):
                self.weights = per_image / per_image.sum()

    def set_start_iter(self, start_iter: int) -> None:
        """Start (or restart) the stream at iteration ``start_iter``."""
        self.start_iter = int(start_iter)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """(sum(sizes),) int64 image indices of one epoch."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.weights is None:
            return torch.randperm(self.total, generator=generator)
        return torch.multinomial(self.weights, self.total, replacement=True, generator=generator)

    def __iter__(self) -> Iterator[List[int]]:
        global_batch = self.batch_per_rank * self.world_size
        position = self.start_iter * global_batch + self.rank * self.batch_per_rank
        epoch, order = None, None
        while True:
            batch = []
            for item in range(position, position + self.batch_per_rank):
                e, offset = divmod(item, self.total)
                if e != epoch:
                    epoch, order = e, self.epoch_order(e)
                batch.append(int(order[offset]))
            yield batch
            position += global_batch

    def __len__(self) -> int:  # infinite; DataLoader only needs it for len()
        raise TypeError("ResumableBatchSampler is infinite")
