"""The ``nanomoe`` command: subcommands dispatch to their modules."""

import sys
from typing import Optional

USAGE = "usage: nanomoe compare [options]   (nanomoe compare --help for the options)"


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("compare",):
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    from nanomoe.compare import cli

    cli.main(args[1:])
