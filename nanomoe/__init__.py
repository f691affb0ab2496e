"""nanomoe: NanoMoE layers, a parameter-efficient replacement for ``nn.Linear``.

See SPEC.md for the definition. The compiled operator library is required; importing fails loudly
without it rather than falling back to the slow reference.
"""

import torch  # noqa: F401  (the operator library links against torch: load it first)

from nanomoe import _library

_library.load()

from nanomoe import budget, reference  # noqa: E402
from nanomoe._ops import nanomoe_linear  # noqa: E402
from nanomoe.fit import fit_dense  # noqa: E402
from nanomoe.layers import LowRankLinear, NanoMoELinear  # noqa: E402
from nanomoe.replace import CompressionReport, LayerReport, replace_linear  # noqa: E402

__all__ = [
    "CompressionReport",
    "LayerReport",
    "LowRankLinear",
    "NanoMoELinear",
    "budget",
    "fit_dense",
    "nanomoe_linear",
    "reference",
    "replace_linear",
]
__version__ = "0.1.0"
