"""perf.loader=dali: JPEG batches decoded and augmented by an NVIDIA DALI pipeline.

The reader processes are perf.gpu_decode's (`ShardReader` with encoded=True): they send each
batch's encoded bytes, labels and every sample's drawn augmentation, in the megabatch plan's
order. `DaliDecoder` feeds one such batch at a time to a DALI pipeline through
`fn.external_source` and runs it once, so DALI neither reorders, drops nor re-draws anything:
the crop windows and flips are the readers' draws, applied with DALI's kernels (region-of-
interest JPEG decode, antialiased resize, mirror). Batches come back as uint8 (B, C, H, W)
tensors on the training device, the layout `SampleTransform.apply` produces, and differ from
the CPU path's pixels only by decoder and resize rounding (docs/PERFORMANCE.md, "DALI input").

On a GPU the decoder is DALI's "mixed" one (nvJPEG, and the GPU's hardware JPEG engine where
it has one); on a CPU-only machine the pipeline has no device (device_id=None) and runs DALI's
CPU operators. `device_decode.decode_on_device` runs the decoder in its background thread,
batches ahead of the training step, as it does for perf.gpu_decode.

DALI is imported here and nowhere else, and only when a decoder is built: a run without
perf.loader=dali does not pay its import.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from app_dist.data.augment import CIFAR_PADDING, Draw, SampleTransform
from app_dist.data.image_headers import image_header
from app_dist.foundations.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class _Geometry:
    """What a pipeline does to each decoded image; one pipeline per geometry and batch size.

    kind: "resized_crop" (augment=imagenet, training: the drawn box, resized to `size`),
    "centre" (imagenet evaluation: short side to size * 256/224, centre crop), "padded_crop"
    (augment=cifar, training: pad 4 with zeros, crop at the drawn offset) or "whole" (the
    decoded image as it is)."""

    kind: str
    size: int
    channels: int


def geometry_of(transform: SampleTransform) -> _Geometry:
    """The pipeline geometry that reproduces `transform.apply` for its draws."""
    if transform.augment == "imagenet":
        kind = "resized_crop" if transform.train else "centre"
    elif transform.augment == "cifar" and transform.train:
        kind = "padded_crop"
    else:
        kind = "whole"
    return _Geometry(kind, transform.image_size, transform.channels)


def centre_window(height: int, width: int, size: int) -> tuple[float, float, float, float]:
    """The evaluation crop of augment=imagenet as a window of the *original* image: (top,
    left, bottom, right) in source pixels, fractional. Resizing that window to size x size
    samples the same points as `SampleTransform.apply` (resize the short side, then centre
    crop), so DALI can do it in one resize; the arithmetic is torchvision's own, including
    its truncated long side and Python's round-half-to-even of the crop offset."""
    resize = int(round(size * 256 / 224))
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(resize * long / short)
    new_height, new_width = (resize, new_long) if height <= width else (new_long, resize)
    top = int(round((new_height - size) / 2.0))
    left = int(round((new_width - size) / 2.0))
    scale_y, scale_x = height / new_height, width / new_width
    return (top * scale_y, left * scale_x, (top + size) * scale_y, (left + size) * scale_x)


class DaliDecoder:
    """Decodes encoded batches with DALI on `device` (cuda: the "mixed" nvJPEG decoder; cpu:
    DALI's CPU operators). Builds one pipeline per geometry on first use and keeps it for the
    run (rebuilt only for a larger batch than it was built for; smaller ones, such as an
    evaluation pass's last batch, run in it as they are). Calls are serialised by a lock: a
    pipeline holds one batch in flight, so two passes' decode threads must take turns."""

    def __init__(self, device: torch.device, num_threads: int) -> None:
        self.device = device
        # DALI's CPU threads do the work the reader processes do on the default path
        # (Huffman decoding, and on the CPU everything), so they get as many threads.
        self.num_threads = max(1, num_threads)
        self.pipelines: dict[_Geometry, Any] = {}
        self.lock = threading.Lock()

    def __call__(self, encoded: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
                 draws: list[Draw | None], transform: SampleTransform,
                 device: torch.device) -> Batch:
        """One batch as the readers pack it -> (uint8 images (B, C, H, W), int64 labels), both
        on `device`. Same signature as `device_decode.decode_batch`, so decode_on_device can
        run either."""
        geometry = geometry_of(transform)
        flat, lengths = encoded
        files = np.split(flat.numpy(), np.cumsum(lengths.numpy())[:-1])
        inputs = _inputs(geometry, files, draws)
        with self.lock:
            pipeline = self.pipelines.get(geometry)
            if pipeline is None or pipeline.max_batch_size < len(files):
                pipeline = self.pipelines[geometry] = self._build(geometry, len(files))
            try:
                for name, values in inputs.items():
                    pipeline.feed_input(name, values)
                (output,) = pipeline.run()
                images = self._to_torch(output)
            except RuntimeError as error:
                # A pipeline that failed mid-run is not reused: the next batch builds anew.
                del self.pipelines[geometry]
                raise DataError(f"perf.loader=dali: cannot decode a batch of {len(files)} "
                                f"images ({_reason(error)}): is one of them corrupt?") from None
        return images, labels.to(device, non_blocking=True)

    def _build(self, geometry: _Geometry, batch_size: int) -> Any:
        from nvidia.dali import Pipeline, fn, types

        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if on_gpu else None
        # Default executor, one batch in flight: each run consumes exactly the batch fed
        # before it, so batches leave in the order the readers sent them.
        pipeline = Pipeline(batch_size=batch_size, num_threads=self.num_threads,
                            device_id=device_id, prefetch_queue_depth=1, seed=0)
        decoder = {"device": "mixed" if on_gpu else "cpu",
                   "output_type": types.GRAY if geometry.channels == 1 else types.RGB,
                   # torchvision decodes pixels as stored, as the readers' draws assume
                   "adjust_orientation": False}
        if on_gpu:
            decoder["jpeg_fancy_upsampling"] = True  # libjpeg-turbo's chroma upsampling
        with pipeline:
            data = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            mirror = 0
            if geometry.kind in ("resized_crop", "padded_crop"):
                anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
                shape = fn.external_source(name="shape", dtype=types.INT32, ndim=1)
                mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
                if geometry.kind == "resized_crop":
                    # Only the drawn box is decoded (ROI decode), then resized.
                    images = fn.decoders.image_slice(data, anchor, shape, axis_names="WH",
                                                     **decoder)
                    images = fn.resize(images, resize_x=geometry.size, resize_y=geometry.size,
                                       antialias=True)
                else:
                    # cifar's padding is the zero fill of a window reaching past the image.
                    images = fn.slice(fn.decoders.image(data, **decoder), anchor, shape,
                                      axis_names="WH", out_of_bounds_policy="pad",
                                      fill_values=0)
            else:
                images = fn.decoders.image(data, **decoder)
                if geometry.kind == "centre":
                    roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
                    roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
                    images = fn.resize(images, resize_x=geometry.size, resize_y=geometry.size,
                                       roi_start=roi_start, roi_end=roi_end, antialias=True)
            # HWC -> CHW (and the drawn flip) in one kernel; uint8 in, uint8 out: exact.
            images = fn.crop_mirror_normalize(images, mirror=mirror, output_layout="CHW",
                                              dtype=types.UINT8)
            pipeline.set_outputs(images)
        pipeline.build()
        return pipeline

    def _to_torch(self, output: Any) -> torch.Tensor:
        """DALI's batch -> a torch tensor of this process's own memory (DALI reuses its
        output buffers on the next run)."""
        if not output.is_dense_tensor():
            shapes = sorted({tuple(shape) for shape in output.shape()})[:3]
            raise DataError(f"perf.loader=dali: the images of a batch differ in size "
                            f"({shapes} ...): set data.augment so that they are cropped to "
                            "one size")
        if self.device.type != "cuda":
            return torch.from_numpy(output.as_array())
        from nvidia.dali.plugin.pytorch import feed_ndarray

        tensor = output.as_tensor()
        images = torch.empty(tensor.shape(), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device)
        feed_ndarray(tensor, images, cuda_stream=stream)
        # Block this (decode) thread, not training, until the copy is done: DALI may
        # overwrite its output buffer as soon as the next batch runs.
        stream.synchronize()
        return images


def _inputs(geometry: _Geometry, files: list[np.ndarray],
            draws: list[Draw | None]) -> dict[str, list[np.ndarray]]:
    """The external_source inputs of one batch, per sample, from the readers' draws (and for
    the centre crop, the image sizes in the JPEG headers)."""
    inputs: dict[str, list[np.ndarray]] = {"encoded": files}
    if geometry.kind in ("resized_crop", "padded_crop"):
        offset = CIFAR_PADDING if geometry.kind == "padded_crop" else 0
        boxes = [drawn for drawn in draws if drawn is not None]
        if len(boxes) != len(files):
            raise DataError("perf.loader=dali: a training batch without augmentation draws")
        inputs["anchor"] = [np.array([left - offset, top - offset], np.int32)
                            for top, left, _, _, _ in boxes]
        inputs["shape"] = [np.array([width, height], np.int32)
                           for _, _, height, width, _ in boxes]
        inputs["mirror"] = [np.array(int(flip), np.int32) for *_, flip in boxes]
    elif geometry.kind == "centre":
        windows = [centre_window(*image_header(file.tobytes())[:2], geometry.size)
                   for file in files]
        # DALI's resize takes the region in tensor-shape order: (y, x).
        inputs["roi_start"] = [np.array(window[:2], np.float32) for window in windows]
        inputs["roi_end"] = [np.array(window[2:], np.float32) for window in windows]
    return inputs


def _reason(error: RuntimeError) -> str:
    """The cause in DALI's many-line pipeline error: the line after "encountered:"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else type(error).__name__
