"""ImageNet class identity and the label maps built on it.

An ImageNet folder names each class by its WordNet id (wnid); the ImageNet-1k index of a
class is its position in the official sorted-wnid table shipped here (imagenet_classes.tsv,
the public class list: index, wnid, name). A folder holding only some of the 1000 classes
gets folder indices that are NOT ImageNet indices, so every label map goes through the wnid.
"""

from __future__ import annotations

import csv
import functools
import io
from importlib import resources

from app_dist.foundations.errors import DataError

# The classic 9-class Restricted ImageNet (APP_SPEC.md section 5; Tsipras et al.'s
# robustness library): super-class -> inclusive ImageNet-1k index range.
RESTRICTED_IMAGENET: tuple[tuple[str, int, int], ...] = (
    ("dog", 151, 268),
    ("cat", 281, 285),
    ("frog", 30, 32),
    ("turtle", 33, 37),
    ("bird", 80, 100),
    ("primate", 365, 382),
    ("fish", 389, 397),
    ("crab", 118, 121),
    ("insect", 300, 319),
)

LABEL_MAPS = ("restricted_imagenet",)


@functools.cache
def imagenet_index() -> dict[str, int]:
    """{wnid: ImageNet-1k index} for all 1000 classes."""
    text = resources.files("app_dist.data.prepare").joinpath("imagenet_classes.tsv").read_text()
    rows = csv.DictReader(io.StringIO(text), delimiter="\t")
    return {row["wnid"]: int(row["imagenet_index"]) for row in rows}


def restricted_imagenet_class(imagenet_class: int) -> int | None:
    """The super-class (0 dog .. 8 insect) of an ImageNet-1k index, None outside the ranges."""
    for label, (_, first, last) in enumerate(RESTRICTED_IMAGENET):
        if first <= imagenet_class <= last:
            return label
    return None


class LabelMap:
    """Maps a class folder's wnid to a new label (or None: drop its images)."""

    def __init__(self, name: str) -> None:
        if name not in LABEL_MAPS:
            raise DataError(f"unknown label map '{name}' (choose from {', '.join(LABEL_MAPS)})")
        self.name = name
        self.classes = [superclass for superclass, _, _ in RESTRICTED_IMAGENET]

    def __call__(self, wnid: str) -> int | None:
        index = imagenet_index().get(wnid)
        if index is None:
            raise DataError(f"class folder '{wnid}' is not an ImageNet-1k wnid (needed by "
                            f"--label-map {self.name})")
        return restricted_imagenet_class(index)
