"""The serving API's request and response types, and its OpenAPI document built from them.

The request types are msgspec Structs made for one deployment's sizes
(:func:`api_types`: the context width, the item feature width, the largest
slate, the most candidates), so the decoder that validates a body and the
document that describes it are the same code: a context of the wrong length, a
``k`` out of range or a non-finite number fails decoding with msgspec's reason,
and the document says exactly that. :func:`openapi` builds the OpenAPI 3.1
document that ``GET /openapi.json`` serves (``msgspec.json.schema_components``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

import msgspec

from contracts.events import (
    MAX_CANDIDATES,
    MAX_EXCLUDED,
    CandidateSource,
    Feature,
    Id,
    Team,
)
from contracts.features import NamedFeatures

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1"


class SlateEntry(msgspec.Struct, frozen=True):
    """One recommended item."""

    item_id: str
    position: int
    #: Probability that the policy showed this item in this slate.
    propensity: float
    team: Team | None


class RecommendationResponse(msgspec.Struct, frozen=True):
    """A ranked slate; its impression was logged under ``request_id`` (clicks refer to it)."""

    request_id: str
    user_id: str
    policy: str
    model_version: int
    cold_start: bool
    index_version: int | None
    items: list[SlateEntry]


class RankResponse(RecommendationResponse, frozen=True):
    """A slate from ``POST /v1/rank``, saying where its candidates came from."""

    candidate_source: CandidateSource


class ErrorBody(msgspec.Struct, frozen=True):
    """Every 4xx and 5xx: what went wrong, and each reason."""

    error: str
    reasons: list[str]


class Health(msgspec.Struct, frozen=True):
    """``/healthz``: ``status`` is ``ok`` once there is something to recommend from."""

    status: str
    index_version: int | None
    catalog_items: int
    popular_items: int
    policies: dict[str, int]
    impressions_logged: bool


@dataclass(frozen=True)
class ApiTypes:
    """The request types for one deployment's sizes."""

    recommendation_query: type[msgspec.Struct]
    rank_query: type[msgspec.Struct]
    candidate: type[msgspec.Struct]
    max_k: int


@lru_cache(maxsize=16)
def api_types(context_dim: int, item_dim: int, max_k: int, max_candidates: int) -> ApiTypes:
    """Request Structs whose bounds are these sizes (cached: one set per configuration)."""
    if not 1 <= max_candidates <= MAX_CANDIDATES:
        raise ValueError(f"max_candidates must be in [1, {MAX_CANDIDATES}], got {max_candidates}")
    context = Annotated[
        list[Feature],
        msgspec.Meta(
            min_length=context_dim,
            max_length=context_dim,
            description=f"The request context: {context_dim} finite numbers.",
        ),
    ]
    k = Annotated[int, msgspec.Meta(ge=1, le=max_k, description="Slate size.")]
    item_features = Annotated[
        list[Feature],
        msgspec.Meta(
            min_length=item_dim,
            max_length=item_dim,
            description=f"Item features ({item_dim} finite numbers), replacing the catalog's.",
        ),
    ]
    options: dict[str, Any] = {"forbid_unknown_fields": True, "frozen": True, "kw_only": True}
    candidate = msgspec.defstruct(
        "Candidate",
        [("id", Id), ("features", item_features | None, None)],
        namespace={"__doc__": "A candidate item the client wants ranked."},
        **options,
    )
    recommendation_query = msgspec.defstruct(
        "RecommendationQuery",
        [("user_id", Id), ("k", k | None, None), ("context", context | None, None)],
        namespace={"__doc__": "POST /v1/recommendations: a slate for a user."},
        **options,
    )
    rank_query = msgspec.defstruct(
        "RankQuery",
        [
            ("user_id", Id),
            ("k", k | None, None),
            (
                "candidates",
                Annotated[
                    list[candidate],  # type: ignore[valid-type]
                    msgspec.Meta(
                        min_length=1,
                        max_length=max_candidates,
                        description="Rank exactly these (unique ids); omit to let serving "
                        "retrieve candidates.",
                    ),
                ]
                | None,
                None,
            ),
            (
                "exclude",
                Annotated[
                    list[Id],
                    msgspec.Meta(
                        max_length=MAX_EXCLUDED,
                        description="Ids never to show (retrieved or client candidates).",
                    ),
                ],
                [],
            ),
            ("context", context | None, None),
            (
                "features",
                Annotated[
                    NamedFeatures,
                    msgspec.Meta(
                        description="Named features hashed into the context "
                        "(contracts.features); exclusive with context."
                    ),
                ]
                | None,
                None,
            ),
        ],
        namespace={"__doc__": "POST /v1/rank: rank retrieved or client-supplied candidates."},
        **options,
    )
    return ApiTypes(recommendation_query, rank_query, candidate, max_k)


def _json(ref: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": ref}}


def openapi(types: ApiTypes, *, anonymous: bool = False) -> dict[str, Any]:
    """The OpenAPI document of the serving API (``GET /openapi.json``).

    Every authenticated operation documents 401 (and, with a body, 413); every
    error body is :class:`ErrorBody`. ``anonymous``: the deployment takes no
    token, and the document says so (no security requirement).
    """
    (query, rank, response, rank_response, error, health), components = (
        msgspec.json.schema_components(
            [
                types.recommendation_query,
                types.rank_query,
                RecommendationResponse,
                RankResponse,
                ErrorBody,
                Health,
            ],
            ref_template="#/components/schemas/{name}",
        )
    )

    def errors(*codes: int) -> dict[str, Any]:
        described = {
            400: "Bad input; `reasons` lists every problem found.",
            401: "Missing or wrong bearer token.",
            413: "Body larger than STREAMREC_SERVING_MAX_BODY_BYTES.",
            503: "Nothing published to recommend from yet, or (impression_ack) Kafka did "
            "not take the impression.",
        }
        wanted = [c for c in codes if c != 401 or not anonymous]
        return {str(c): {"description": described[c], "content": _json(error)} for c in wanted}

    def slate(description: str, body: dict[str, Any] | None, ok: dict[str, Any]) -> dict:
        operation: dict[str, Any] = {
            "summary": description,
            "responses": {"200": {"description": "The slate.", "content": _json(ok)}},
        }
        if body is not None:
            operation["requestBody"] = {"required": True, "content": _json(body)}
            operation["responses"] |= errors(400, 401, 413, 503)
        else:
            operation["responses"] |= errors(400, 401, 503)
        return operation

    get = slate("A slate for a user, scored with a context of zeros.", None, response)
    get["parameters"] = [
        {
            "name": "user_id",
            "in": "query",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 128},
        },
        {
            "name": "k",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": types.max_k},
        },
    ]
    open_access: list[dict[str, list[str]]] = []
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "streamrec serving",
            "version": API_VERSION,
            "description": "Recommendations and ranking; every 200 is logged as one impression.",
        },
        "paths": {
            "/v1/recommendations": {
                "get": get,
                "post": slate("A slate for a user and a request context.", query, response),
            },
            "/v1/rank": {
                "post": slate(
                    "Rank retrieved or client-supplied candidates, with exclusions and "
                    "named features.",
                    rank,
                    rank_response,
                )
            },
            "/healthz": {
                "get": {
                    "summary": "Whether there is something to recommend from.",
                    "security": open_access,
                    "responses": {
                        "200": {"description": "Ready.", "content": _json(health)},
                        "503": {"description": "Nothing published yet.", "content": _json(health)},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics.",
                    "responses": {
                        "200": {
                            "description": "The exposition format.",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    }
                    | errors(401),
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "security": open_access,
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {"schemas": components},
    }
    if not anonymous:
        document["components"]["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer"}
        }
        document["security"] = [{"bearerAuth": []}]
    return document
