"""Structured channel pruning (Torch-Pruning's dependency graph): the spec, the criteria,
the channel flow Torch-Pruning cannot follow, and pruning to a measured latency (a per-layer
latency table and a planner).

:data:`PRUNING_CRITERIA` is the table of importance criteria (``compress list criteria``).
"""

from compress.pruning.spec import PRUNING_CRITERIA

__all__ = ["PRUNING_CRITERIA"]
