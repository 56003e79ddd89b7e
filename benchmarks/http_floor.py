"""The HTTP floor: serving's server stack answering a fixed slate, nothing else.

Starlette under uvicorn, started by :func:`services.common.webserver.serve` with
the workers serving itself uses, routing ``/v1/recommendations`` and returning a
ten-item slate of the same shape as serving's (built once). Whatever serving
answers slower than this is streamrec's own work per request.

Run: ``python -m benchmarks.http_floor --port 8091 [--workers 2]``.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.common.webserver import serve

SLATE = json.dumps(
    {
        "request_id": "0" * 32,
        "user_id": "u0",
        "policy": "linucb",
        "model_version": 1,
        "cold_start": False,
        "index_version": 1,
        "items": [
            {"item_id": f"i{n}", "position": n, "propensity": 0.9, "team": None} for n in range(10)
        ],
    }
).encode()


async def recommendations(request: Request) -> Response:
    await request.body()
    return Response(SLATE, media_type="application/json")


def app() -> Starlette:
    return Starlette(
        routes=[Route("/v1/recommendations", recommendations, methods=["GET", "POST"])]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    return serve(
        lambda _worker: nullcontext(app()), host=args.host, port=args.port, workers=args.workers
    )


if __name__ == "__main__":
    raise SystemExit(main())
