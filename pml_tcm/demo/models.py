"""Small trunk and embedder networks for the open-world examples.

pml's trainers take a ``trunk`` (features) and an ``embedder`` (features -> embedding);
these are the two pieces for 28x28 grey images (Fashion-MNIST) and for flat 8x8
digits.
"""

from __future__ import annotations

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Two conv blocks and a linear layer: ``(N, 1, 28, 28) -> (N, feature_size)``.

    Args:
        feature_size: width of the output features.
        channels: channels of the two conv blocks.
    """

    def __init__(self, feature_size: int = 128, channels: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, first, kernel_size=3, padding=1),
            nn.BatchNorm2d(first),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, kernel_size=3, padding=1),
            nn.BatchNorm2d(second),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(second * 7 * 7, feature_size),
            nn.BatchNorm1d(feature_size),
            nn.ReLU(inplace=True),
        )
        self.feature_size = feature_size

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


class MLP(nn.Module):
    """Two hidden layers for flat inputs: ``(N, input_size) -> (N, feature_size)``.

    Args:
        input_size: length of one input vector (64 for 8x8 digits).
        feature_size: width of the hidden layers and of the output features.
    """

    def __init__(self, input_size: int = 64, feature_size: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, feature_size),
            nn.BatchNorm1d(feature_size),
            nn.ReLU(inplace=True),
            nn.Linear(feature_size, feature_size),
            nn.BatchNorm1d(feature_size),
            nn.ReLU(inplace=True),
        )
        self.feature_size = feature_size

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)


def make_embedder(feature_size: int, embedding_size: int) -> nn.Module:
    """The embedder pml's trainers put after the trunk: one linear layer.

    Args:
        feature_size: width of the trunk's output.
        embedding_size: dimension of the embedding.
    """
    return nn.Linear(feature_size, embedding_size)


def make_trunk(input_shape: tuple[int, ...], feature_size: int = 128) -> nn.Module:
    """A trunk fitting the input: :class:`SmallCNN` for ``(1, 28, 28)`` images,
    :class:`MLP` for flat vectors.

    Raises:
        ValueError: any other input shape.
    """
    if tuple(input_shape) == (1, 28, 28):
        return SmallCNN(feature_size)
    if len(input_shape) == 1:
        return MLP(input_shape[0], feature_size)
    raise ValueError(f"no trunk for inputs of shape {tuple(input_shape)}")
