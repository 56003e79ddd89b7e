"""What the HTTP apps (gateway, serving) share: bearer-token auth and a body cap.

- :func:`check_token` refuses a configuration without a token unless anonymity
  is explicitly allowed, or with a blank token;
- :class:`BearerAuth` compares ``Authorization: Bearer <token>`` in constant
  time (:func:`hmac.compare_digest`), so the comparison leaks nothing of the
  token through timing;
- :func:`read_body` reads a request body up to a byte limit, refusing a larger
  declared ``Content-Length`` before reading anything and a chunked body as soon
  as it passes the limit (:class:`BodyTooLarge`);
- :func:`error_response` is the ``{"error", "reasons"}`` body every 4xx/5xx of
  the apps carries.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import JSONResponse

from contracts.errors import StreamrecError


class BodyTooLarge(StreamrecError):
    """A request body over the app's limit (a 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"body exceeds {limit} bytes")
        self.limit = limit


def check_token(token: SecretStr | None, allow_anonymous: bool, *, app: str, prefix: str) -> None:
    """Raise ``ValueError`` unless ``token`` is set (and not blank) or anonymity is allowed.

    ``app`` names the app and ``prefix`` its settings prefix (``STREAMREC_GATEWAY_``)
    in the message, which says which variable to set.
    """
    if token is None:
        if not allow_anonymous:
            raise ValueError(
                f"the {app} needs {prefix}TOKEN (clients then send "
                f"'Authorization: Bearer <token>'); set {prefix}ALLOW_ANONYMOUS=true "
                "to accept unauthenticated requests on a trusted network"
            )
    elif not token.get_secret_value().strip():
        raise ValueError(f"{prefix}TOKEN is empty")


class BearerAuth:
    """Checks ``Authorization: Bearer <token>``; ``token=None`` lets everyone in."""

    def __init__(self, token: SecretStr | None) -> None:
        self._token = token.get_secret_value().encode() if token is not None else None

    @property
    def anonymous(self) -> bool:
        return self._token is None

    def authorised(self, request: Request) -> bool:
        if self._token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, supplied = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(supplied.encode(), self._token)


def error_response(
    status: int,
    error: str,
    reasons: Sequence[str] = (),
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """``{"error": error, "reasons": [...]}`` with ``status``."""
    return JSONResponse(
        {"error": error, "reasons": list(reasons) or [error]}, status_code=status, headers=headers
    )


def unauthorised() -> JSONResponse:
    """The 401 of a request without the right bearer token."""
    return error_response(
        401,
        "missing or invalid bearer token",
        ["send 'Authorization: Bearer <token>'"],
        headers={"WWW-Authenticate": "Bearer"},
    )


def too_large(exc: BodyTooLarge) -> JSONResponse:
    """The 413 of a body over the limit."""
    return error_response(413, str(exc), [f"send at most {exc.limit} bytes"])


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, or :class:`BodyTooLarge` once it passes ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise BodyTooLarge(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)
