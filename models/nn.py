"""Building blocks shared by the torch modules: fully connected stacks and a batch one-hot helper."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def mlp(
    n_in: int,
    hidden: Sequence[int],
    n_out: int | None = None,
    dropout: float = 0.0,
    batch_norm: bool = False,
    layer_norm: bool = False,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear → [norm] → activation → [dropout] for each hidden width, then an optional linear output."""
    layers: list[nn.Module] = []
    width = n_in
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if batch_norm:
            layers.append(nn.BatchNorm1d(size, momentum=0.01, eps=1e-3))
        if layer_norm:
            layers.append(nn.LayerNorm(size))
        layers.append(activation())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    if n_out is not None:
        layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def with_batch(x: torch.Tensor, batch_index: torch.Tensor | None, n_batches: int) -> torch.Tensor:
    """Append the one-hot batch covariate to `x` (unchanged when the model has no batch covariate)."""
    if n_batches == 0 or batch_index is None:
        return x
    return torch.cat([x, nn.functional.one_hot(batch_index, n_batches).to(x.dtype)], dim=-1)
