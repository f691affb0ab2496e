"""The ``nanomoe`` command: subcommands dispatch to their modules."""

import importlib
import sys
from typing import Optional

# Subcommand -> the module whose main(argv) runs it; imported only when chosen (transformers and
# the comparison's tasks take seconds to import).
COMMANDS = {"compare": "nanomoe.compare.cli", "compress": "nanomoe.compress"}

USAGE = (
    "usage: nanomoe {compare,compress} [options]   (nanomoe COMMAND --help for the options)\n"
    "  compare   NanoMoE against dense, low-rank, Monarch and MoE layers on built-in tasks\n"
    "  compress  replace a saved model's linear layers by NanoMoE and save it"
)


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module(COMMANDS[args[0]]).main(args[1:])
