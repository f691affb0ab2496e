"""Hypothesis profiles: CI runs a fixed, reproducible set of examples; `thorough` searches anew.

pytest --hypothesis-profile=thorough     # fresh random examples, ten times as many
"""

import pytest
from hypothesis import settings

settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("thorough", deadline=None, max_examples=1500)
settings.load_profile("default")


@pytest.fixture(scope="session")
def transformers():
    """The transformers package, quiet; the test is skipped where it is not installed."""
    module = pytest.importorskip("transformers")
    module.logging.set_verbosity_error()
    return module
