"""bench/offline_bundle.py: packages split into parts for an offline GPU machine come back whole,
or are refused with one line that names what is wrong."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from bench.offline_bundle import site_tree, write_parts
from tests.conftest import REPO

PART_BYTES = 100_000


def wheel(folder: Path, name: str, files: dict[str, bytes]) -> Path:
    path = folder / f"{name}-1.0-py3-none-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return path


def unpack(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "bench" / "offline_bundle.py"), "unpack",
                           *map(str, args)], capture_output=True, text=True, timeout=60)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


def test_a_bundle_carried_in_parts_unpacks_to_the_tree_pip_would_lay_out(tmp_path: Path) -> None:
    library = random.Random(0).randbytes(3 * PART_BYTES)  # incompressible: several parts
    wheels = [wheel(tmp_path, "alpha", {
                  "alpha/__init__.py": b"VERSION = 1\n",
                  "alpha/_ext.cpython-312-x86_64-linux-gnu.so": b"for 3.12",
                  "alpha/_ext.cpython-311-x86_64-linux-gnu.so": b"for 3.11",
                  "alpha/_ext.cpython-313t-x86_64-linux-gnu.so": b"for 3.13t",
                  "alpha-1.0.data/platlib/alpha_tool.py": b"TOOL = 1\n",
                  "alpha-1.0.data/scripts/alpha-index": b"#!python\n",
                  "alpha-1.0.dist-info/METADATA": b"Name: alpha\n"}),
              wheel(tmp_path, "beta", {"nvidia/__init__.py": b"",
                                       "nvidia/beta/lib/libbeta.so": library})]
    site = tmp_path / "site"
    site_tree(wheels, "3.12", site)
    expected = files_under(site)
    # As pip installs them: NAME.data/platlib at the top, no scripts; only the target
    # Python's extension; no nvidia/__init__.py to replace the target's own.
    assert sorted(expected) == ["alpha-1.0.dist-info/METADATA", "alpha/__init__.py",
                                "alpha/_ext.cpython-312-x86_64-linux-gnu.so", "alpha_tool.py",
                                "nvidia/beta/lib/libbeta.so"]

    parts = write_parts(site, PART_BYTES, tmp_path / "parts")
    assert len(parts) == 4 and all(p.stat().st_size <= PART_BYTES for p in parts)
    sha = parts[0].name.split("-")[1].split(".")[0]
    assert [p.name for p in parts] == [f"bundle-{sha}.tar.xz.{k}-of-4" for k in range(1, 5)]

    # The parts arrive in two folders (this call's carry and the stash of earlier calls).
    carried, stash = tmp_path / "carried", tmp_path / "stash"
    carried.mkdir()
    stash.mkdir()
    shutil.copy(parts[0], carried)
    for part in parts[2:]:
        shutil.copy(part, stash)
    result = unpack("--target", tmp_path / "target", carried, stash)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: bundle {sha} lacks part(s) 2 of 4"
    assert not (tmp_path / "target").exists()

    damaged = bytearray(parts[1].read_bytes())
    damaged[1000] ^= 0xFF
    (stash / parts[1].name).write_bytes(bytes(damaged))
    result = unpack("--target", tmp_path / "target", carried, stash)
    assert result.returncode == 1
    assert "parts join to another sha256: a part is damaged" in result.stderr

    # The target already has an `nvidia` package (torch's CUDA libraries) and another
    # version of alpha: the first stays whole, the second is replaced, and that is said.
    target = tmp_path / "target"
    (target / "nvidia" / "cudnn").mkdir(parents=True)
    (target / "nvidia" / "__init__.py").write_bytes(b"")
    (target / "nvidia" / "cudnn" / "libcudnn.so").write_bytes(b"cudnn")
    (target / "alpha").mkdir()
    (target / "alpha" / "__init__.py").write_bytes(b"VERSION = 0  # older\n")
    shutil.copy(parts[1], stash)
    result = unpack("--target", target, carried, stash)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"bundle {sha} extracted into {target}; it replaced 1 "
                                     "file(s) of other sizes there, e.g. alpha/__init__.py")
    assert files_under(target) == {**expected, "nvidia/__init__.py": b"",
                                   "nvidia/cudnn/libcudnn.so": b"cudnn"}

    # Packing again into the same folder leaves one bundle there, never two.
    (site / "alpha" / "__init__.py").write_bytes(b"VERSION = 2\n")
    again = write_parts(site, PART_BYTES, tmp_path / "parts")
    assert sorted((tmp_path / "parts").iterdir()) == sorted(again) and again != parts
    for part in again:  # the stash still holds the first bundle's parts
        shutil.copy(part, stash)
    result = unpack("--target", tmp_path / "elsewhere", stash)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: expected the parts of one bundle in {stash}; "
                                    "found 2")
