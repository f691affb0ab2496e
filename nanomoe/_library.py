"""Loads the compiled operator library. No fallback: without it, importing nanomoe fails."""

import importlib

BUILD_HINT = (
    "nanomoe's compiled extension (nanomoe._C) could not be loaded. Build it against the torch you "
    "have installed:\n"
    "    pip install --no-build-isolation -e .      (from a source checkout)\n"
    "or run `make test`, which creates .venv and builds everything. "
    "nanomoe never falls back to the slow pure-PyTorch reference silently."
)


def load() -> None:
    """Import nanomoe._C, which registers the torch.ops.nanomoe operators."""
    try:
        importlib.import_module("nanomoe._C")
    except ImportError as error:
        raise ImportError(f"{BUILD_HINT}\nCause: {error}") from error
