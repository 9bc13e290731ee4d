"""The `mi-krr` command line.

Every subcommand takes `--device`, `--seed`, `--out` and `--debug`. Errors a user can fix (a
missing file, an unsupported checkpoint, a bad option) print one line with the fix and exit 2;
the traceback only with `--debug`. Heavy imports (torch, transformer-lens) happen inside the
subcommands, so `mi-krr --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

CommandRunner = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


def _add_common_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _register_train(subparsers: argparse._SubParsersAction) -> CommandRunner:
    from mi_krr.train.cli import add_train_parser, run_train

    parser = add_train_parser(subparsers)
    _add_common_options(parser, default_out="runs/train")
    return run_train


COMMANDS: dict[str, Callable[[argparse._SubParsersAction], CommandRunner]] = {
    "train": _register_train,
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, CommandRunner]]:
    parser = argparse.ArgumentParser(
        prog="mi-krr",
        description="Is what an in-context regression transformer computes kernel ridge regression, and by which algorithm?",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    runners = {name: register(subparsers) for name, register in COMMANDS.items()}
    return parser, runners


def main(argv: list[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return runners[args.command](args)
    except (UsageError, ValueError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"mi-krr {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
