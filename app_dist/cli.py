"""`app-dist`: one entry point with a subcommand per job."""

from __future__ import annotations

import sys
from collections.abc import Callable

from app_dist.foundations.commands import BAD_INPUT, UsageError, report_bad_input


def _shards(argv: list[str]) -> int:
    if argv[:1] == ["append"]:  # publish the next megabatch of a stream
        from app_dist.data.prepare.stream import main as append

        return append(argv[1:])
    from app_dist.data.prepare.shards import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from app_dist.training.launcher import main

    return main(argv)


def _report(argv: list[str]) -> int:
    from app_dist.results.report import main

    return main(argv)


def _inspect(argv: list[str]) -> int:
    from app_dist.results.inspection import main

    return main(argv)


def _demo(argv: list[str]) -> int:
    from app_dist.demo import main

    return main(argv)


def _experiment(argv: list[str]) -> int:
    from app_dist.experiment import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from app_dist.results.export import main

    return main(argv)


def _profile(argv: list[str]) -> int:
    from app_dist.training.profiling import main

    return main(argv)


def _sweep(argv: list[str]) -> int:
    from app_dist.sweep import main

    return main(argv)


SUBCOMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "shards": (_shards, "write WebDataset shards and their manifest; `shards append` "
                        "publishes a stream's next megabatch"),
    "train": (_train, "train one run (as app_dist/train.py); --nproc-per-node N launches ranks"),
    "report": (_report, "plot runs against megabatch and write an HTML report"),
    "inspect": (_inspect, "show a run or checkpoint: config, progress, densities, resumable?"),
    "demo": (_demo, "digits shards + a 2-rank APP run with torchrun (as `make demo`)"),
    "experiment": (_experiment, "dense vs OSP vs APP over seeds: runs, tables, plots, report"),
    "export": (_export, "write a run's final model in compact sparse form"),
    "sweep": (_sweep, "Ray Tune sweep over distributed trials (as launch/sweep.py)"),
    "profile": (_profile, "time one megabatch phase by phase (data, forward, ..., checkpoint)"),
}


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS) + 2
    lines = ["usage: app-dist SUBCOMMAND [--help] ...", "", "subcommands:"]
    lines += [f"  {name:<{width}}{about}" for name, (_, about) in SUBCOMMANDS.items()]
    lines += ["", "`app-dist SUBCOMMAND --help` explains one subcommand and its options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else BAD_INPUT
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        return report_bad_input(UsageError(f"unknown subcommand '{name}'; choose one of: "
                                           f"{', '.join(SUBCOMMANDS)}"))
    return SUBCOMMANDS[name][0](rest)


if __name__ == "__main__":
    sys.exit(main())
