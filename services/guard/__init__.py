"""The model guard's library: a sequential test on live feedback that detects a drop
in a policy's reward with a bounded false-alarm rate (:mod:`services.guard.sequential`),
and the decision logic that turns feedback into alarms and the version to roll back to
(:mod:`services.guard.watch`). The service that pins models is
:mod:`services.guard.service`.
"""

from __future__ import annotations

from services.guard.sequential import (
    Counts,
    Design,
    Scan,
    false_alarms_per_hour,
    scan,
    threshold_for,
)
from services.guard.watch import SELF, Alarm, PartitionCounts, Watch

__all__ = [
    "SELF",
    "Alarm",
    "Counts",
    "Design",
    "PartitionCounts",
    "Scan",
    "Watch",
    "false_alarms_per_hour",
    "scan",
    "threshold_for",
]
