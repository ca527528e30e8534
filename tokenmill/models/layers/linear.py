"""Linear layers whose output packs several checkpoint projections side by side."""

import torch
from torch import nn


class PackedLinear(nn.Linear):
    """One matmul for several projections of the same input (e.g. q/k/v, gate/up).

    ``shards`` maps each checkpoint projection name to its output width, in the
    order the shards are laid out along the output dimension.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_sizes = list(shards.values())
        self.shard_ranges: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shards.items():
            self.shard_ranges[name] = (start, size)
            start += size

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split ``out [..., out_features]`` back into per-shard views."""
        return out.split(self.shard_sizes, dim=-1)
