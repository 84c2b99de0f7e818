"""ImageNet class identity and the Restricted ImageNet label maps built on it.

An ImageNet folder names each class by its WordNet id (wnid); the ImageNet-1k index of a
class is its position in the official sorted-wnid table shipped here (imagenet_classes.tsv,
the public class list: index, wnid, name, and the classic Restricted ImageNet super-class as
published with it). A folder holding only some of the 1000 classes gets folder indices that
are NOT ImageNet indices, so every label map goes through the wnid.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib import resources

from app_dist.foundations.errors import DataError


@dataclass(frozen=True)
class SuperclassMap:
    """One Restricted ImageNet variant: label i is `ranges[i]`, a super-class name and the
    inclusive ImageNet-1k index range of the classes it gathers; every other class is
    dropped."""

    name: str  # the --label-map value
    ranges: tuple[tuple[str, int, int], ...]

    @property
    def classes(self) -> list[str]:
        return [superclass for superclass, _, _ in self.ranges]

    def superclass_of(self, imagenet_class: int) -> int | None:
        """The label of an ImageNet-1k index, None outside every range."""
        for label, (_, first, last) in enumerate(self.ranges):
            if first <= imagenet_class <= last:
                return label
        return None


# Both variants as the robustness library defines them (Engstrom et al., MadryLab/robustness,
# tools/constants.py: BALANCED_RANGES and RESTRICTED_IMAGNET_RANGES), labels in its order.
# The APP authors trained on the balanced one (their dataset.py imports
# RestrictedImageNetBalanced), so it is the default: 14 super-classes of 5 ImageNet classes
# each (monkeys 4), 69 classes in all. docs/METHOD.md section 5.
RESTRICTED_IMAGENET_BALANCED = SuperclassMap("restricted_imagenet", (
    ("bird", 10, 14),
    ("turtle", 33, 37),
    ("lizard", 42, 46),
    ("spider", 72, 76),
    ("crab", 118, 122),  # the robustness library's "crabs + lobsters": 122 is American lobster
    ("dog", 200, 204),
    ("cat", 281, 285),
    ("big_cat", 286, 290),
    ("beetle", 302, 306),
    ("butterfly", 322, 326),
    ("monkey", 371, 374),
    ("fish", 393, 397),
    ("fruit", 948, 952),
    ("fungus", 992, 996),
))
# The classic 9-class Restricted ImageNet of Tsipras et al. (2019), very unbalanced (117 dog
# classes, 3 frog classes); selectable, not what the paper used.
RESTRICTED_IMAGENET_CLASSIC = SuperclassMap("restricted_imagenet_classic", (
    ("dog", 151, 268),
    ("cat", 281, 285),
    ("frog", 30, 32),
    ("turtle", 33, 37),
    ("bird", 80, 100),
    ("primate", 365, 382),
    ("fish", 389, 397),
    ("crab", 118, 121),
    ("insect", 300, 319),
))

LABEL_MAPS: dict[str, SuperclassMap] = {
    variant.name: variant for variant in (RESTRICTED_IMAGENET_BALANCED, RESTRICTED_IMAGENET_CLASSIC)
}


@functools.cache
def imagenet_index() -> dict[str, int]:
    """{wnid: ImageNet-1k index} for all 1000 classes."""
    text = resources.files("app_dist.data.prepare").joinpath("imagenet_classes.tsv").read_text()
    rows = csv.DictReader(io.StringIO(text), delimiter="\t")
    return {row["wnid"]: int(row["imagenet_index"]) for row in rows}


class LabelMap:
    """Maps a class folder's wnid to a new label (or None: drop its images)."""

    def __init__(self, name: str) -> None:
        if name not in LABEL_MAPS:
            raise DataError(f"unknown label map '{name}' (choose from {', '.join(LABEL_MAPS)})")
        self.name = name
        self.superclasses = LABEL_MAPS[name]
        self.classes = self.superclasses.classes

    def __call__(self, wnid: str) -> int | None:
        index = imagenet_index().get(wnid)
        if index is None:
            raise DataError(f"class folder '{wnid}' is not an ImageNet-1k wnid (needed by "
                            f"--label-map {self.name})")
        return self.superclasses.superclass_of(index)
