"""The `mi-krr` command line.

    mi-krr demo                       diagnose the shipped and constructed models (< 3 min, CPU)
    mi-krr diagnose PATH              diagnose any supported checkpoint (mi-krr or Garg et al.)
    mi-krr compare PATH [PATH ...]    saved diagnoses side by side (report folders, .npz files)
    mi-krr construct cg --steps 5     build a constructed solver transformer and check it
    mi-krr reproduce cg-rate          one of the project's reproductions (or `all`)
    mi-krr train --preset softmax_gp  train a model

Every subcommand takes `--device`, `--seed`, `--out` and `--debug`. Errors a user can fix (a
missing file, an unsupported checkpoint, a bad option) print one line with the fix and exit 2;
the traceback only with `--debug`. Heavy imports (torch, transformer-lens) happen inside the
subcommands, so `mi-krr --help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

CommandRunner = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (`mi-krr demo: error: ... (see mi-krr demo --help)`)
    instead of the usage block; subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_common_options(parser: argparse.ArgumentParser, default_out: str, from_config: bool = False) -> None:
    """--device, --seed, --out, --debug. With `from_config`, all three default to None: the run's
    own configuration keeps its values unless they are given (`default_out` where it names no
    folder)."""
    if from_config:
        parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: the config's)")
        parser.add_argument("--seed", type=int, default=None, help="random seed (default: the config's)")
        parser.add_argument("--out", default=None, help=f"output folder (default: the config's train.out_dir, else {default_out})")
    else:
        parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
        parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
        parser.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _register_train(subparsers: argparse._SubParsersAction) -> CommandRunner:
    from mi_krr.train.cli import DEFAULT_OUT, add_train_parser, run_train

    parser = add_train_parser(subparsers)
    _add_common_options(parser, default_out=DEFAULT_OUT, from_config=True)
    return run_train


def _registrar(module_name: str) -> Callable[[argparse._SubParsersAction], CommandRunner]:
    """Registration of the command module `mi_krr.commands.<module_name>`, the command's name:
    its docstring is the command's --help description, `add_arguments(parser)` adds its options
    (returning its default --out), `run(args)` runs it. The modules import only argparse at
    import time."""

    def register(subparsers: argparse._SubParsersAction) -> CommandRunner:
        import importlib

        module = importlib.import_module(f"mi_krr.commands.{module_name}")
        parser = subparsers.add_parser(module_name, help=SUMMARIES[module_name], description=module.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common_options(parser, default_out=module.add_arguments(parser))
        return module.run

    return register


COMMANDS: dict[str, Callable[[argparse._SubParsersAction], CommandRunner]] = {
    "demo": _registrar("demo"),
    "diagnose": _registrar("diagnose"),
    "compare": _registrar("compare"),
    "construct": _registrar("construct"),
    "reproduce": _registrar("reproduce"),
    "train": _register_train,
}

# One line per command for `mi-krr --help`, so listing the commands imports none of them.
SUMMARIES: dict[str, str] = {
    "demo": "diagnose the shipped and constructed models and write a report (CPU, < 3 min)",
    "diagnose": "diagnose a checkpoint (mi-krr run folder or Garg et al. run) and write a report",
    "compare": "compare saved diagnoses (report folders or .npz files) side by side",
    "construct": "build a constructed CG / Richardson / GD transformer and compare it with its solver",
    "reproduce": "run a reproduction (cg-rate, width, softmax-ood, richardson-profile, all)",
    "train": "train an in-context regression transformer (checkpoints, exact resume)",
}


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, CommandRunner]]:
    """The parser and the runners of the registered commands. With `only`, that command alone
    is fully registered (its module imported) and the others are listed by name, which keeps
    `mi-krr --help` and every other command free of the rest's imports."""
    parser = OneLineParser(
        prog="mi-krr",
        description="Is what an in-context regression transformer computes kernel ridge regression, and by which algorithm?",
        epilog="Run `mi-krr COMMAND --help` for a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    runners = {}
    for name, register in COMMANDS.items():
        if only is None or name == only:
            runners[name] = register(subparsers)
        else:
            subparsers.add_parser(name, help=SUMMARIES[name], add_help=False)
    return parser, runners


def _requested_command(argv: list[str]) -> str:
    """The command named in `argv` (its first non-option word), or "" when none is."""
    first = next((word for word in argv if not word.startswith("-")), "")
    return first if first in COMMANDS else ""


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The subparser of `command` (the top-level parser when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def _check_device(device: str | None) -> None:
    """UsageError, before any work starts, unless torch can compute on `device` here (None: the
    command's configured device); `check_device`'s reason, in the command line's words."""
    from mi_krr._validation import check_device

    try:
        check_device("--device", device)
    except ValueError as error:
        raise UsageError(str(error).replace(": pass e.g. 'cpu'", ": pass e.g. --device cpu")) from error


def _check_out(out: str | None) -> None:
    """UsageError, before any work starts, where --out names something that is not a folder (an
    existing file, or a path through one)."""
    if out is None:
        return
    path = Path(out)
    blocker = next((part for part in (path, *path.parents) if part.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UsageError(f"--out {out!r} cannot be a folder: {str(blocker)!r} is a file; pass a folder path")


def _options_before_command(argv: list[str]) -> str | None:
    """The one-line error for options written before the command (`mi-krr --seed 3 construct
    cg`), showing the command line reordered; None when argv does not start that way."""
    command_at = next((index for index, word in enumerate(argv) if word in COMMANDS), None)
    if not command_at or not argv[0].startswith("-") or argv[0] in ("-h", "--help"):
        return None
    reordered = [argv[command_at], *argv[:command_at], *argv[command_at + 1 :]]
    return f"mi-krr: error: options go after the command: mi-krr {' '.join(reordered)}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")  # the CLI only writes figures to files; a user's setting wins
    argv = sys.argv[1:] if argv is None else list(argv)
    misplaced = _options_before_command(argv)
    if misplaced:
        print(misplaced, file=sys.stderr)
        return 2
    parser, runners = build_parser(only=_requested_command(argv))
    args, extras = parser.parse_known_args(argv)
    if extras:  # reported by the subcommand's parser, so the message points at its --help
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _check_device(getattr(args, "device", None))
        _check_out(getattr(args, "out", None))
        if getattr(args, "seed", None) is not None:
            from mi_krr._validation import check_seed

            check_seed("--seed", args.seed)
        return runners[args.command](args)
    except (UsageError, ValueError, FileNotFoundError) as error:
        if args.debug:
            raise
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"mi-krr {args.command}: error: {message} (rerun with --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"mi-krr {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
