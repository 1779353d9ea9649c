"""Resumable batch sources.

The engine accepts any iterable of batches (dicts of tensors, each rank's own micro-batch). A source that has
``state_dict()`` / ``load_state_dict()`` resumes at its position in O(1); any other iterable is re-created and
fast-forwarded by the number of batches already consumed (exact for deterministic iterables).

Sources here index batches by a *global* position and slice each global batch by rank, so a run resumes
exactly on a different world size.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch


def _slice(batch: dict, rank: int, world: int) -> dict:
    if world == 1:
        return batch
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim > 0 or isinstance(v, list):
            n = len(v)
            if n % world:
                raise ValueError(f"global batch of {n} rows (key {k!r}) does not split over {world} ranks")
            per = n // world
            out[k] = v[rank * per:(rank + 1) * per]
        else:
            out[k] = v
    return out


class DemoBatches:
    """Random batches from ``model.demo_batch``: global batch ``i`` comes from a generator seeded with
    ``(seed, i)``; each rank takes its contiguous ``1/world`` slice. ``extra(batch_size, generator)`` may add keys
    (e.g. fixed flow noise and times, so runs on different world sizes see the same random draws)."""

    def __init__(self, model, global_batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 extra: Callable[[int, torch.Generator], dict] | None = None, limit: int | None = None):
        self.make = model.demo_batch
        self.global_batch_size, self.seed, self.rank, self.world_size = global_batch_size, seed, rank, world_size
        self.extra, self.limit = extra, limit
        self.position = 0

    def batch(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        b = self.make(batch_size=self.global_batch_size, generator=g)
        if self.extra is not None:
            b.update(self.extra(self.global_batch_size, g))
        return _slice(b, self.rank, self.world_size)

    def __iter__(self) -> Iterator[dict]:
        while self.limit is None or self.position < self.limit:
            i = self.position
            self.position += 1
            yield self.batch(i)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict):
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))


class DatasetBatches:
    """A map-style dataset read in seeded shuffled epochs through ``collate`` (e.g. the model's processor).

    Epoch ``e`` uses ``torch.randperm(len, generator=seed+e)``; the position is ``(epoch, batch index)``. Each
    global batch of ``batch_size × world`` indices is split by rank. ``num_workers > 0`` reads with a
    ``DataLoader`` over the remaining indices of the epoch."""

    def __init__(self, dataset, batch_size: int, collate: Callable[[list], dict], *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, num_workers: int = 0,
                 epochs: int | None = None):
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.drop_last, self.num_workers, self.epochs = drop_last, num_workers, epochs
        self.epoch, self.index = 0, 0
        n = len(dataset)
        g = batch_size * world_size
        self.per_epoch = n // g if drop_last else -(-n // g)
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {n} frames is smaller than one global batch ({batch_size} × {world_size} ranks)")

    def _order(self, epoch: int) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def _indices(self, epoch: int, b: int) -> list[int]:
        g = self.batch_size * self.world_size
        rows = self._order(epoch)[b * g:(b + 1) * g]
        per = len(rows) // self.world_size
        return rows[self.rank * per:(self.rank + 1) * per]

    def __iter__(self):
        while self.epochs is None or self.epoch < self.epochs:
            order = self._order(self.epoch)
            g = self.batch_size * self.world_size
            batches = []
            for b in range(self.index, self.per_epoch):
                rows = order[b * g:(b + 1) * g]
                per = len(rows) // self.world_size
                batches.append(rows[self.rank * per:(self.rank + 1) * per])
            if self.num_workers > 0:
                loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate,
                                                     num_workers=self.num_workers)
                it = iter(loader)
            else:
                it = (self.collate([self.dataset[i] for i in rows]) for rows in batches)
            for batch in it:
                self.index += 1
                yield batch
            self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict):
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.seed = int(state.get("seed", self.seed))


__all__ = ["DemoBatches", "DatasetBatches"]
