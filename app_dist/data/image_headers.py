"""The size and channel count of an encoded JPEG or PNG, read from its header.

Both sides of the shard format use it: the shard writer (app_dist.data.prepare) records
whether every image shares one size and channel count, and the readers draw an image's
augmentation from its size without decoding it (perf.gpu_decode).
"""

from __future__ import annotations

import io

# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# PNG colour type -> channels readers get: gray and gray+alpha are 1, the rest convert to RGB.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF_MARKERS and i + 10 <= n:
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return (height, width, data[i + 9]) if height and width else None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def image_header(data: bytes) -> tuple[int, int, int]:
    """(height, width, channels) of encoded JPEG or PNG bytes, channels 1 for grayscale and 3
    otherwise. Reads the header only (microseconds), falling back to PIL for odd files."""
    header = None
    if data[:2] == b"\xff\xd8":
        header = _jpeg_header(data)
        if header is not None:
            header = (header[0], header[1], 1 if header[2] == 1 else 3)
    elif data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 26:
        colour = _PNG_CHANNELS.get(data[25])
        if colour is not None:
            header = (int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big"),
                      colour)
    if header is None:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            gray = image.mode in ("1", "L", "LA", "I", "I;16", "F")
            header = (image.height, image.width, 1 if gray else 3)
    return header
