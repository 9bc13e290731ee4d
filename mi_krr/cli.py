"""The `mi-krr` command line (subcommands are filled in by later work)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mi-krr", description=__doc__)
    parser.add_argument("command", nargs="?", default=None)
    args = parser.parse_args(argv)
    parser.print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":
    sys.exit(main())
