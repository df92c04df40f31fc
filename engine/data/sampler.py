"""Data-parallel sharded, deterministic, resumable sample order.

Epoch e is a permutation of all sample indices drawn from seed + e (or 0..n-1 without shuffle), cut to
a multiple of dp_size (the at most dp_size-1 dropped indices differ from epoch to epoch), and rank r
reads positions r, r + dp_size, ... of it. The state is (epoch, position in this rank's shard): after
`load_state_dict` the sampler continues with exactly the next index, nothing repeated or skipped.
"""

from __future__ import annotations

import numpy as np


class ShardedSampler:
    def __init__(self, num_samples: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if num_samples < dp_size:
            raise ValueError(f"{num_samples} samples cannot be split over {dp_size} data-parallel ranks; add data")
        self.num_samples = num_samples
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.position = 0  # next position in this epoch's shard
        self._cache: tuple[int, np.ndarray] | None = None

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices for `epoch`, in reading order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.shuffle:
            order = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        usable = (self.num_samples // self.dp_size) * self.dp_size
        shard = order[:usable][self.dp_rank :: self.dp_size]
        self._cache = (epoch, shard)
        return shard

    @property
    def shard_size(self) -> int:
        return self.num_samples // self.dp_size

    def take(self, n: int) -> tuple[np.ndarray, int]:
        """Up to n next indices of the current epoch (fewer at its end) and the epoch they belong to.
        The state always points at the next index: at an epoch's end it moves to (epoch + 1, 0)."""
        epoch = self.epoch
        shard = self.shard(epoch)
        out = shard[self.position : self.position + n]
        self.position += len(out)
        if self.position >= self.shard_size:
            self.epoch, self.position = epoch + 1, 0
        return out, epoch

    def __iter__(self):
        """Endless: index after index, epoch after epoch."""
        while True:
            idx, _ = self.take(1)
            yield int(idx[0])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": self.num_samples,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "dp_size", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this run has {getattr(self, key)}; resume with the "
                    "same data file, data.seed, data.shuffle and data-parallel size"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
