"""The demo model's network (`DemoNet`): four small conv blocks, global average pooling, a linear head.

workers/demo.py holds its data, training and cache, and re-exports `DemoNet`.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_block(c_in: int, c_out: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    # Not inplace: an inplace ReLU rewrites a hooked tensor and breaks
    # backward hooks (captum, pytorch-grad-cam).
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    return nn.Sequential(conv, nn.ReLU(inplace=False))


class DemoNet(nn.Module):
    """Four conv blocks (ReLU), global average pooling, a linear head.

    Input (N, 3, 64, 64) in model space; block3/block4 maps are (N, C, 16, 16);
    output logits (N, num_classes). No dropout, no batch norm: the forward is
    a fixed function once trained, which attribution tests rely on.
    """

    def __init__(self, num_classes: int = 4, widths: tuple[int, int, int, int] = (16, 32, 32, 32)):
        super().__init__()
        # A 4x4 stride-2 stem sees one full period of the 4 px patterns and
        # quarters the cost of everything after it (training time is the budget).
        self.block1 = _conv_block(3, widths[0], kernel=4, stride=2, padding=1)  # (N, w0, 32, 32)
        self.block2 = _conv_block(widths[0], widths[1], kernel=3, stride=2, padding=1)  # (N, w1, 16, 16)
        self.block3 = _conv_block(widths[1], widths[2], kernel=3, stride=1, padding=1)  # (N, w2, 16, 16)
        self.block4 = _conv_block(widths[2], widths[3], kernel=1, stride=1, padding=0)  # (N, w3, 16, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.head(self.pool(x).flatten(1))

    def init_weights(self, gen: torch.Generator) -> None:
        """Kaiming init from `gen`, so weights never depend on the global RNG."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu", generator=gen)
                nn.init.zeros_(module.bias)
