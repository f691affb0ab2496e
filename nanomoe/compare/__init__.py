"""``nanomoe compare``: train one model several times, changing only its fully connected layers.

The pieces, one module each:

- ``layers``: the layer types under comparison (dense ``nn.Linear``, ``LowRankLinear``, Monarch,
  NanoMoE of each mixing) and ``layer_factory``, which sizes each to a budget with
  ``nanomoe.budget``. A ``LinearFactory`` is ``(in_features, out_features, bias) -> nn.Module``:
  a task builds its model with it wherever it would write ``nn.Linear``.
- ``tasks``: the training tasks (character-level transformer, digits MLP, teacher-student), each
  needing no download.
- ``runner``: training, learning-rate tuning on held-out data, seeds, timing, memory.
- ``data_parallel``: the same runs on several processes under ``torchrun`` (DDP).
- ``report``: the table, JSON and plots.
- ``cli``: ``nanomoe compare`` / ``python -m nanomoe compare``.
"""

from typing import Callable

from torch import nn

LinearFactory = Callable[[int, int, bool], nn.Module]

__all__ = ["LinearFactory"]
