"""Online crowd label aggregation (kd-aggregate): BiLA-CM and offline/sliding-window baselines.

* :mod:`.crowdio` -- reading labels (long CSV/TSV, dense matrix), chunking, the repeat rule.
* :mod:`.bila` -- BiLA-CM: model, loss (eq. 2.11), optimiser (Algorithm 2.1), training, inference.
* :mod:`.baselines` -- majority vote, Dawid-Skene EM, MACE.
* :mod:`.online` -- :class:`Aggregator`: vocabularies, label store, one chunk at a time.
* :mod:`.state` -- the state file.
* :mod:`.simulate` -- the dissertation's synthetic crowds.
* :mod:`.plot` -- error-rate curves.
"""

from .bila import BilaConfig, BilaModel
from .online import METHODS, Aggregator, ChunkResult

__all__ = ["Aggregator", "BilaConfig", "BilaModel", "ChunkResult", "METHODS"]
