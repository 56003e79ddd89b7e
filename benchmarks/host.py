"""What a benchmark ran on, recorded next to its figures (imported by the scripts here)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any


def describe_host(*packages: str, **extra: Any) -> dict[str, Any]:
    """CPU, platform, Python, load and the versions of ``packages`` (None if absent)."""

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        **{package: version(package) for package in ("numpy", *packages)},
        **extra,
    }
