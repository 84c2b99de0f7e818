"""Decoding and augmentation of one sample, on uint8 tensors, with an explicit generator.

Augmentations draw from a torch.Generator owned by the reading worker (seeded from the run
seed, megabatch, epoch, rank and worker) instead of torch's global RNG, so data order and
augmentation are a pure function of those coordinates whatever the number of processes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF


def decode(image_bytes: bytes, channels: int) -> torch.Tensor:
    """Encoded JPEG/PNG bytes -> uint8 tensor (channels, H, W)."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    data = torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8)
    return decode_image(data, mode=mode)


def pad_crop_flip(image: torch.Tensor, generator: torch.Generator,
                  padding: int = 4) -> torch.Tensor:
    """CIFAR augmentation: random crop of the original size from a zero-padded image + flip."""
    _, height, width = image.shape
    padded = F.pad(image, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    crop = padded[:, top : top + height, left : left + width]
    if torch.rand((), generator=generator) < 0.5:
        crop = crop.flip(-1)
    return crop


def random_resized_crop_box(height: int, width: int, generator: torch.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            ) -> tuple[int, int, int, int]:
    """(top, left, h, w) as torchvision's RandomResizedCrop chooses it, from `generator`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        fraction = scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=generator))
        target_area = area * fraction
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0])
                          * float(torch.rand((), generator=generator)))
        w = int(round(math.sqrt(float(target_area) * aspect)))
        h = int(round(math.sqrt(float(target_area) / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fallback: the whole image, clamped to the ratio range
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class SampleTransform:
    """Bytes -> augmented uint8 tensor. Picklable, so DataLoader workers can carry it."""

    def __init__(self, channels: int, augment: str, image_size: int, train: bool) -> None:
        self.channels = channels
        self.augment = augment
        self.image_size = image_size
        self.train = train

    def __call__(self, image_bytes: bytes, generator: torch.Generator) -> torch.Tensor:
        image = decode(image_bytes, self.channels)
        if self.augment == "imagenet":
            if self.train:
                top, left, h, w = random_resized_crop_box(*image.shape[1:], generator)
                image = TF.resized_crop(image, top, left, h, w, [self.image_size] * 2,
                                        antialias=True)
                if torch.rand((), generator=generator) < 0.5:
                    image = image.flip(-1)
                return image
            resize = int(round(self.image_size * 256 / 224))
            image = TF.resize(image, [resize], antialias=True)
            return TF.center_crop(image, [self.image_size] * 2)
        if self.augment == "cifar" and self.train:
            return pad_crop_flip(image, generator)
        return image
