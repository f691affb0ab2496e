"""Hypothesis profiles: CI runs a fixed, reproducible set of examples; `thorough` searches anew.

pytest --hypothesis-profile=thorough     # fresh random examples, ten times as many
"""

from hypothesis import settings

settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("thorough", deadline=None, max_examples=1500)
settings.load_profile("default")
