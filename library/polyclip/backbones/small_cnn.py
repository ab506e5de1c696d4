"""A small CNN for 28-32 px images (Fashion-MNIST, CIFAR-sized data)."""

from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv stages (widths ``w, 2w, 4w``) with max-pooling and global average pooling.

    Args:
        in_chans: Input channels.
        width: Channels of the first stage; the embedding has ``4 * width`` dimensions.

    Shapes:
        ``(B, in_chans, H, W) -> (B, 4 * width)``.
    """

    def __init__(self, in_chans: int = 1, width: int = 32) -> None:
        super().__init__()
        self.num_features = 4 * width
        self.body = nn.Sequential(
            _block(in_chans, width),
            nn.MaxPool2d(2),
            _block(width, 2 * width),
            nn.MaxPool2d(2),
            _block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.body(x)
