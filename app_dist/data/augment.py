"""Decoding and augmentation of one sample, on uint8 tensors, with an explicit generator.

Augmentations draw from a torch.Generator owned by the reading worker (seeded from the run
seed, megabatch, epoch, rank and worker) instead of torch's global RNG, so data order and
augmentation are a pure function of those coordinates whatever the number of processes.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PILLOW_MODES = {1: "L", 3: "RGB"}  # channels -> the Pillow mode that holds them as uint8


def decode(image_bytes: bytes, channels: int) -> torch.Tensor:
    """Encoded JPEG/PNG bytes -> uint8 tensor (channels, H, W).

    An 8-bit PNG already in the wanted mode is read by Pillow: PNG is lossless, so the
    pixels are torchvision's (tests/test_shards.py compares them), in a fifth of the time
    (1,797 digits: 0.3 s against 1.5 s), and torchvision is not imported (0.4 s of CPU a
    process). JPEGs, whose decoders differ in rounding, and PNGs that need converting are
    torchvision's, as before."""
    if image_bytes[:8] == PNG_SIGNATURE:
        from PIL import Image

        image = Image.open(io.BytesIO(image_bytes))
        if image.mode == PILLOW_MODES.get(channels):
            pixels = torch.from_numpy(np.array(image))
            return pixels.unsqueeze(0) if channels == 1 else pixels.permute(2, 0, 1)
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    data = torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8)
    return decode_image(data, mode=mode)


def model_input_size(augment: str, image_size: int, stored: tuple[int, int] | None
                     ) -> tuple[int, int]:
    """(H, W) of the images the model sees: augment=imagenet crops every image to
    `image_size` (training and evaluation); otherwise images reach the model at their
    `stored` size (the manifest's; None when sizes vary, which only imagenet resizes)."""
    if augment == "imagenet" or stored is None:
        return image_size, image_size
    return stored


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


# One sample's random draw: the crop box (top, left, height, width) and whether to flip it.
Draw = tuple[int, int, int, int, bool]

CIFAR_PADDING = 4


class SampleTransform:
    """Bytes -> augmented uint8 tensor. Picklable, so DataLoader workers can carry it.

    Drawing the random parameters (`draw`, which needs only the image size) is separate from
    applying them (`apply`, plain tensor ops on any device), so a worker decoding JPEGs, the
    decoded-sample cache and GPU decoding all draw the same numbers in the same order from
    the same generator and produce the same augmentation.
    """

    def __init__(self, channels: int, augment: str, image_size: int, train: bool) -> None:
        self.channels = channels
        self.augment = augment
        self.image_size = image_size
        self.train = train

    def __call__(self, image_bytes: bytes, generator: torch.Generator) -> torch.Tensor:
        return self.augment_decoded(decode(image_bytes, self.channels), generator)

    def augment_decoded(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A decoded uint8 (C, H, W) image -> its augmented version."""
        return self.apply(image, self.draw(image.shape[1], image.shape[2], generator))

    def draw(self, height: int, width: int, generator: torch.Generator) -> Draw | None:
        """This sample's random parameters (None: nothing random), consuming `generator`."""
        if not self.train or self.augment not in ("cifar", "imagenet"):
            return None
        if self.augment == "imagenet":
            top, left, h, w = random_resized_crop_box(height, width, generator)
        else:  # pad by 4, crop the original size at a random offset
            top, left = torch.randint(0, 2 * CIFAR_PADDING + 1, (2,), generator=generator).tolist()
            h, w = height, width
        flip = bool(torch.rand((), generator=generator) < 0.5)
        return top, left, h, w, flip

    def apply(self, image: torch.Tensor, drawn: Draw | None) -> torch.Tensor:
        """`image` augmented with the parameters `draw` chose (on the image's device)."""
        if self.augment == "imagenet":
            from torchvision.transforms.v2 import functional as TF  # see decode
            if drawn is None:  # evaluation: resize the short side, centre crop
                resize = int(round(self.image_size * 256 / 224))
                image = TF.resize(image, [resize], antialias=True)
                return TF.center_crop(image, [self.image_size] * 2)
            top, left, h, w, flip = drawn
            image = TF.resized_crop(image, top, left, h, w, [self.image_size] * 2,
                                    antialias=True)
        elif drawn is not None:
            top, left, h, w, flip = drawn
            pad = CIFAR_PADDING
            image = F.pad(image, (pad, pad, pad, pad))[:, top : top + h, left : left + w]
        else:
            return image
        return image.flip(-1) if flip else image
