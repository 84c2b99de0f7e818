"""`app-dist demo`: the digits shards (written once) and a 2-rank APP run, like `make demo`.

    app-dist demo [--nproc 2] [--data data/digits] [--config configs/digits.yaml] [key=value ...]

The run is launched with torchrun (`python -m torch.distributed.run --standalone`, which
picks a free rendezvous port, so two demos on one machine do not collide) on the installed
`app_dist.train` module; on a CPU-only machine the ranks talk over gloo.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from app_dist.config import load_config
from app_dist.data.manifest import MANIFEST_NAME
from app_dist.foundations.commands import ArgumentParser, UsageError, command

DEMO_CONFIG = Path("configs") / "digits.yaml"
DIGITS_SAMPLES_PER_SHARD = 25  # 60 train shards: enough for 2 ranks x 1 worker each


def find_config(given: str | None) -> Path:
    """The demo config: `given`, else configs/digits.yaml in the working directory or in the
    source checkout this package was installed from."""
    if given is not None:
        return Path(given)
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / DEMO_CONFIG).is_file():
            return root / DEMO_CONFIG
    raise UsageError(f"{DEMO_CONFIG} not found in {Path.cwd()} or the source checkout; run "
                     "from the repository root or pass --config")


def ensure_digits_shards(folder: Path) -> None:
    """Write scikit-learn's bundled digits as shards into `folder` unless already there."""
    if (folder / MANIFEST_NAME).is_file():
        print(f"[demo] digits shards already in {folder}", flush=True)
        return
    from app_dist.data.prepare.shards import write_shards

    manifest = write_shards("digits", None, str(folder), DIGITS_SAMPLES_PER_SHARD, seed=0)
    count = sum(split.num_samples for split in manifest.splits.values())
    print(f"[demo] wrote {count} digits samples as shards into {folder}", flush=True)


def launch_command(nproc: int, config: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "--module", "app_dist.train",
            "--config", str(config), *overrides]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="app-dist demo",
        description="Write the digits shards if missing, then train the digits config "
                    "(APP with SNIP, 4 megabatches) on NPROC ranks with torchrun, as `make demo`.",
        epilog="Example: app-dist demo train.epochs=2   (extra key=value overrides)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks to launch (default 2)")
    parser.add_argument("--data", default="data/digits",
                        help="shard folder, written if it holds no manifest (default data/digits)")
    parser.add_argument("--config", default=None,
                        help=f"config file (default {DEMO_CONFIG} of the repository)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser


@command(build_parser)
def main(args: argparse.Namespace) -> int:
    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: must be >= 1")
    config = find_config(args.config)
    overrides = [f"data.shards={args.data}", *args.overrides]
    load_config(config, overrides)  # bad keys stop here, with one line, before any launch
    ensure_digits_shards(Path(args.data))
    command_line = launch_command(args.nproc, config, overrides)
    print(f"[demo] {' '.join(command_line[2:])}", flush=True)
    return subprocess.run(command_line).returncode


if __name__ == "__main__":
    sys.exit(main())
