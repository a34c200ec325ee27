"""ResNet backbone + MLP projector, as in the official Barlow Twins `main.py`."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from bt_fast.config import BACKBONE_DIM, check_choice


def make_backbone(arch: str) -> nn.Module:
    check_choice("arch", arch, BACKBONE_DIM)
    backbone = getattr(torchvision.models, arch)(zero_init_residual=True)
    backbone.fc = nn.Identity()
    return backbone


def make_projector(in_dim: int, spec: str) -> nn.Sequential:
    """`spec` like '8192-8192-8192': Linear(no bias)-BN-ReLU between layers, last Linear plain."""
    try:
        sizes = [in_dim] + [int(s) for s in spec.split("-")]
    except ValueError:
        raise ValueError(f"projector spec '{spec}' must be sizes joined by '-', e.g. 8192-8192-8192") from None
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 2):
        layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    """Maps two views to their projector outputs; the loss lives in `bt_fast.loss`.

    Each view goes through the network separately, so BatchNorm statistics are per view
    exactly as in the paper's implementation.
    """

    def __init__(self, arch: str = "resnet50", projector: str = "8192-8192-8192"):
        super().__init__()
        self.arch = arch
        self.backbone = make_backbone(arch)
        self.projector = make_projector(BACKBONE_DIM[arch], projector)

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projector(self.backbone(y1)), self.projector(self.backbone(y2))


def build_model(arch: str, projector: str, channels_last: bool = True) -> BarlowTwins:
    model = BarlowTwins(arch, projector)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
