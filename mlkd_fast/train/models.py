"""Networks for the training loop; each returns ``(logits, pooled penultimate features)``."""
from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stages with max pooling, global average pooling and a linear classifier.

    ``widths`` sets the channels of each stage; the feature dimension is ``widths[-1]``.
    """

    def __init__(self, widths: tuple[int, ...], num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.feature_dim = c_in

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.pool(self.body(x)).flatten(1)
        return self.fc(feats), feats


def digits_teacher() -> SmallCNN:
    return SmallCNN((32, 64, 128))


def digits_student() -> SmallCNN:
    return SmallCNN((8, 16, 32))
