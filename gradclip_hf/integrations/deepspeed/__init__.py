"""DeepSpeed ZeRO (stages 1, 2, 3): the pack's step backend on the engine and what it refuses (no transformers;
``deepspeed`` is imported only where a run needs it).

============  ==========================================================================================
module        what it holds
============  ==========================================================================================
``engine``    :class:`EngineStep`: the threshold before each engine step, the pack's skip through the
              engine's own overflow path, per-layer norms between its backward and its step, the report
``checks``    :func:`check_deepspeed` (the refusals, at train start, with the fix), :func:`check_engine`
``snapshot``  :class:`EngineSnapshot`: ``spike_action="rollback"``, exact and in memory
``compat``    every private DeepSpeed detail relied on, with the version it was verified against
============  ==========================================================================================

docs/distributed.md says what works per ZeRO stage and how each row is tested.
"""

from .checks import check_deepspeed, check_engine
from .engine import EngineStep
from .snapshot import EngineSnapshot

__all__ = ["EngineStep", "EngineSnapshot", "check_deepspeed", "check_engine"]
