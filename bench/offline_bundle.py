"""Carry Python packages too large for one transfer to an offline machine, in parts.

    python bench/offline_bundle.py pack --python 3.12 --part-mib 60 --out .bundle REQ [REQ ...]
    python bench/offline_bundle.py unpack [--target SITE] DIR [DIR ...]

Why: the GPU machines lent to this project have no network and take at most 64 MiB of files
per call, the working tree included (2.3 MiB in November 2026), while NVIDIA DALI with its
CUDA libraries is 260 MB of wheels (docs/PERFORMANCE.md, "On a GPU"). `pack` downloads the
wheels named (pip, no dependencies: name every one), unpacks them into one site-packages
tree as pip installs them, drops extension modules built for other Pythons and
`nvidia/__init__.py` (the target's own `nvidia` package must stay as it is: torch finds its
CUDA libraries there), and writes the tree as one xz-compressed tar split into parts
`bundle-<sha256 prefix>.tar.xz.<k>-of-<n>`, each small enough to travel with a call. Each
call copies its part to a folder that outlives the call (bench/gpu_checks.sh's `stash`);
`unpack` checks that every part is there and that the joined archive has the hash its name
states, then extracts it into the target's site-packages (`--target`: where its `nvidia`
package is; by default the running interpreter's platlib), so that the packages' relative
library paths (DALI -> nvimgcodec -> nvidia/cu13's nvJPEG) resolve. It says which files
it replaced with other contents. Standard library only: it runs before anything else is
installed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from pathlib import Path

PART = re.compile(r"^bundle-(?P<sha>[0-9a-f]{16})\.tar\.xz\.(?P<k>\d+)-of-(?P<n>\d+)$")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
EXTENSION = re.compile(r"\.cpython-(?P<tag>\d+t?)-x86_64-linux-gnu\.so$")


def download(requirements: list[str], python: str, into: Path) -> list[Path]:
    platforms = [flag for name in PLATFORMS for flag in ("--platform", name)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", *platforms,
                    "-d", str(into), *requirements], check=True)
    return sorted(into.glob("*.whl"))


def site_tree(wheels: list[Path], python: str, site: Path) -> None:
    """Unpacks the wheels as pip installs them, keeping only `python`'s extensions: a
    wheel's NAME.data/purelib and /platlib go to the top of the tree, its scripts, headers and
    data files are left out (nothing here runs or builds against them)."""
    keep = python.replace(".", "")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for data in site.glob("*.data"):
        for scheme in ("purelib", "platlib"):
            if (data / scheme).is_dir():
                shutil.copytree(data / scheme, site, dirs_exist_ok=True)
        shutil.rmtree(data)
    for path in site.rglob("*.so"):
        match = EXTENSION.search(path.name)
        if match and match["tag"] != keep:
            path.unlink()
    (site / "nvidia" / "__init__.py").unlink(missing_ok=True)


def write_parts(site: Path, part_bytes: int, out: Path) -> list[Path]:
    """`site` as one xz-compressed tar, split into parts of at most `part_bytes` in `out`,
    replacing the parts of an earlier bundle there (unpack takes one bundle per folder)."""
    with tempfile.TemporaryFile() as spool:
        with tarfile.open(fileobj=spool, mode="w:xz", preset=9) as tar:
            for path in sorted(site.iterdir()):
                tar.add(path, arcname=path.name)
        spool.seek(0)
        data = spool.read()
    sha = hashlib.sha256(data).hexdigest()[:16]
    count = -(-len(data) // part_bytes)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("bundle-*"):
        old.unlink()
    parts = []
    for k in range(count):
        part = out / f"bundle-{sha}.tar.xz.{k + 1}-of-{count}"
        part.write_bytes(data[k * part_bytes:(k + 1) * part_bytes])
        parts.append(part)
    return parts


def pack(requirements: list[str], python: str, part_mib: int, out: Path) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="offline-bundle-") as scratch:
        wheels = download(requirements, python, Path(scratch) / "wheels")
        site = Path(scratch) / "site"
        site_tree(wheels, python, site)
        return write_parts(site, part_mib * 2**20, out)


def joined(folders: list[Path]) -> tuple[bytes, str]:
    """The archive from its parts in `folders`; exits naming what is missing or wrong."""
    found: dict[str, dict[int, Path]] = {}
    totals: dict[str, int] = {}
    for folder in folders:
        for path in sorted(folder.glob("bundle-*")):
            if match := PART.match(path.name):
                found.setdefault(match["sha"], {})[int(match["k"])] = path
                totals[match["sha"]] = int(match["n"])
    if len(found) != 1:
        sys.exit(f"error: expected the parts of one bundle in {', '.join(map(str, folders))}; "
                 f"found {len(found)} ({', '.join(found) or 'none'})")
    (sha, parts), = found.items()
    if missing := sorted(set(range(1, totals[sha] + 1)) - set(parts)):
        sys.exit(f"error: bundle {sha} lacks part(s) {', '.join(map(str, missing))} "
                 f"of {totals[sha]}")
    data = b"".join(parts[k].read_bytes() for k in sorted(parts))
    if hashlib.sha256(data).hexdigest()[:16] != sha:
        sys.exit(f"error: bundle {sha}'s parts join to another sha256: a part is damaged")
    return data, sha


def unpack(folders: list[Path], target: Path) -> tuple[str, list[str]]:
    """Extracts the bundle into `target`; returns its hash and the files it replaced there
    with other contents (another version of a package the target already had)."""
    data, sha = joined(folders)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        members = tar.getmembers()
        replaced = [member.name for member in members if member.isfile()
                    and (target / member.name).is_file()
                    and (target / member.name).stat().st_size != member.size]
        tar.extractall(target, members=members, filter="data")
    return sha, replaced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    packing = verbs.add_parser("pack", help="download, unpack, compress and split")
    packing.add_argument("--python", required=True, help="the target's Python, e.g. 3.12")
    packing.add_argument("--part-mib", type=int, default=60, help="largest part, MiB")
    packing.add_argument("--out", type=Path, required=True, help="folder for the parts")
    packing.add_argument("requirements", nargs="+", help="NAME==VERSION, dependencies too")
    unpacking = verbs.add_parser("unpack", help="check the parts and extract them")
    unpacking.add_argument("--target", type=Path,
                           default=Path(sysconfig.get_paths()["platlib"]),
                           help="site-packages to extract into, where the target's own `nvidia` "
                                "package is (default: this Python's platlib)")
    unpacking.add_argument("folders", nargs="+", type=Path, help="folders holding the parts")
    args = parser.parse_args()
    if args.verb == "pack":
        for part in pack(args.requirements, args.python, args.part_mib, args.out):
            print(f"{part} {part.stat().st_size / 2**20:.1f} MiB")
    else:
        sha, replaced = unpack(args.folders, args.target)
        print(f"bundle {sha} extracted into {args.target}"
              + (f"; it replaced {len(replaced)} file(s) of other sizes there, e.g. "
                 f"{', '.join(replaced[:3])}" if replaced else ""))


if __name__ == "__main__":
    main()
