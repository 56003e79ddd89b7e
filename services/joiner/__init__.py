"""The joiner: impressions and clicks become feedback once the attribution window closes."""

from __future__ import annotations

from services.joiner.join import PartitionJoin

__all__ = ["PartitionJoin"]
