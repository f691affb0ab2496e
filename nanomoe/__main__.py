"""``python -m nanomoe compare ...``: the same as the ``nanomoe`` command."""

from nanomoe.cli import main

main()
