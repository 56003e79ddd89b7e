"""The runnable services: each name ``streamrec run NAME`` takes and where its entry point lives.

Both the command line (:mod:`services.cli`) and the embedded stack
(:mod:`services.stack.command`) read this table, so neither imports the other.
"""

from __future__ import annotations

import importlib.util

#: Services and where their ``main() -> int`` lives, as ``module:function``.
SERVICES = {
    "gateway": "services.gateway.app:main",
    "joiner": "services.joiner.service:main",
    "bandits": "services.bandits.service:main",
    "sequences": "services.sequences.service:main",
    "embeddings": "services.embeddings.service:main",
    "drn": "services.drn.service:main",
    "guard": "services.guard.service:main",
    "serving": "services.serving.api:main",
    "console": "services.console.app:main",
}


def available_services() -> list[str]:
    """Services whose module is installed in this build."""
    found = []
    for name, target in SERVICES.items():
        module = target.split(":")[0]
        if importlib.util.find_spec(module) is not None:
            found.append(name)
    return found
