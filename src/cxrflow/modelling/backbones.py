"""Backbone parts the registry's builders use: the paper's simple CNN and activation checkpointing.

Registered by :mod:`cxrflow.modelling.registry`; a backbone maps ``[N, 3, S, S]`` images to pooled
features ``[N, F]``.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn


class SimpleCNN(nn.Module):
    """The paper's baseline feature extractor: two conv blocks, then a fixed 8x8 grid, flattened.

    Adaptive pooling to a fixed grid keeps the layout information a flattening layer would keep,
    at any input size.
    """

    grid = 8

    def __init__(self, channels: tuple[int, int] = (16, 32)):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(self.grid),
            nn.Flatten(),
        )
        self.num_features = c2 * self.grid * self.grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class CheckpointedSequential(nn.Sequential):
    """An ``nn.Sequential`` that, while gradients are wanted, recomputes each block's activations in
    the backward pass (``torch.utils.checkpoint``) instead of storing them. Same children, same
    state-dict keys as the ``nn.Sequential`` it replaces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        for block in self:
            if x.requires_grad or any(p.requires_grad for p in block.parameters()):
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def checkpoint_resnet(net: nn.Module, enable: bool) -> None:
    """Checkpoint every bottleneck block of layer1..layer4 of a torchvision ResNet."""
    kind = CheckpointedSequential if enable else nn.Sequential
    for name in ("layer1", "layer2", "layer3", "layer4"):
        setattr(net, name, kind(*getattr(net, name)))


def checkpoint_densenet(net: nn.Module, enable: bool) -> None:
    """torchvision's own memory-efficient DenseNet: each dense layer recomputes its concatenation
    and bottleneck (the part whose memory grows quadratically with depth)."""
    from torchvision import models as tvm

    for module in net.modules():
        if isinstance(module, tvm.densenet._DenseLayer):
            module.memory_efficient = enable
