"""perf.gpu_decode: JPEG batches decoded and augmented on the device, ahead of training.

The readers send encoded bytes and each sample's drawn augmentation; this module turns them
into image batches on the device. Decoding runs in a thread of its own, on a CUDA stream of
its own, `AHEAD` batches ahead of the training step, so that it can overlap the step rather
than add to it. On an H200 a batch of 256 full-size ImageNet photos decodes and crops in
44 ms, about the time of a bf16 ResNet-50 step; the thread alone did not measurably speed up
training there (the readers' hand-over was the bottleneck then: see pipeline.pack_encoded).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import torch

from app_dist.data.augment import SampleTransform

Batch = tuple[torch.Tensor, torch.Tensor]
AHEAD = 2
_END = object()


def decode_batch(encoded: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor, draws: list,
                 transform: SampleTransform, device: torch.device) -> Batch:
    """One encoded batch, (bytes, lengths) as the readers pack it, decoded as a batch on
    `device` (nvJPEG on CUDA), then each sample's drawn augmentation applied there."""
    from torchvision.io import ImageReadMode, decode_jpeg  # imported when used: augment.decode

    mode = ImageReadMode.GRAY if transform.channels == 1 else ImageReadMode.RGB
    flat, lengths = encoded
    images = decode_jpeg(list(flat.split(lengths.tolist())), mode=mode, device=device)
    images = torch.stack([transform.apply(image, drawn) for image, drawn in zip(images, draws)])
    return images, labels.to(device, non_blocking=True)


def decode_on_device(batches: Iterable, transform: SampleTransform, device: torch.device,
                     decode: Callable[..., Batch] = decode_batch) -> Iterator[Batch]:
    """Yields (images, labels) on `device` for each (encoded, labels, draws) of `batches`,
    in order, decoded by a background thread up to AHEAD batches early. A reader error
    reaches the caller at the batch where it happened; closing the iterator early stops the
    thread. `decode` has decode_batch's signature (perf.loader=dali passes its DaliDecoder)."""
    ready: queue.Queue = queue.Queue(maxsize=AHEAD)
    stop = threading.Event()
    side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(item: object) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                ready.put(item, timeout=0.1)
                return True
        return False

    def decode_ahead() -> None:
        try:
            with torch.cuda.stream(side_stream) if side_stream else contextlib.nullcontext():
                for encoded, labels, draws in batches:
                    batch = decode(encoded, labels, draws, transform, device)
                    done = side_stream.record_event() if side_stream else None
                    if not put((batch, done)):
                        return
        except BaseException as error:  # handed to the training thread, raised there
            put(error)
            return
        put(_END)

    thread = threading.Thread(target=decode_ahead, name="gpu-decode", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            (images, labels), done = item
            if done is not None:
                # The training stream waits for the decode, and the allocator must not hand
                # these blocks back to the side stream while training still reads them.
                current = torch.cuda.current_stream(device)
                current.wait_event(done)
                images.record_stream(current)
                labels.record_stream(current)
            yield images, labels
    finally:
        stop.set()
        thread.join()
