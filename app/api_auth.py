"""Bearer-token authentication of the HTTP API, with three roles.

Off unless ``Settings.api_tokens`` names tokens. Then every request but those to
``Settings.api_open_paths`` (``/health`` and ``/metrics`` by default) needs
``Authorization: Bearer <token>``: no or an unknown token answers 401, a token whose
role is too low 403, both in the API's error envelope. Roles are ranked, each allowing
what the ones below it allow:

- ``read``: GET (and HEAD) requests;
- ``write``: ``POST /api/v1/produce``, ``/api/v1/process``, ``/api/v1/aggregate``;
- ``admin``: everything else (patterns, reference data, pipelines).

It is an aiohttp middleware, so Faust's own routes are covered too. Tokens are
compared as SHA-256 digests with ``hmac.compare_digest`` against every configured
token, so the time taken says nothing about how much of a token matched. Tokens are
never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

ROLES = ("read", "write", "admin")
RANK = {role: rank for rank, role in enumerate(ROLES)}
WRITE_ROUTES = frozenset({"/api/v1/produce", "/api/v1/process", "/api/v1/aggregate"})


class ApiTokensError(ValueError):
    """STREAMETL_API_TOKENS is malformed."""


@dataclass(frozen=True)
class Token:
    role: str
    digest: bytes


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str) -> list[Token]:
    """``role:token`` entries separated by commas or new lines (the token itself is
    never part of an error message)."""
    tokens = []
    for number, entry in enumerate((e.strip() for e in text.replace("\n", ",").split(",")), 1):
        if not entry:
            continue
        role, sep, token = entry.partition(":")
        role = role.strip()
        if not sep or role not in RANK or not token.strip():
            raise ApiTokensError(f"STREAMETL_API_TOKENS entry {number} must be role:token with a role "
                                 f"of {', '.join(ROLES)}")
        tokens.append(Token(role, digest(token.strip())))
    return tokens


def required_role(method: str, path: str) -> str:
    """The lowest role that may make this request."""
    if method in {"GET", "HEAD"}:
        return "read"
    if method == "POST" and path.rstrip("/") in WRITE_ROUTES:
        return "write"
    return "admin"


def role_of(presented: str, tokens: Iterable[Token]) -> str | None:
    """The role of the presented token, or None; every token is compared."""
    wanted = digest(presented)
    found = None
    for token in tokens:
        if hmac.compare_digest(wanted, token.digest):
            found = token.role
    return found


def _error(status: int, code: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message, "details": None}})
    headers = {"WWW-Authenticate": 'Bearer realm="streametl"'} if status == 401 else None
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(tokens: list[Token], open_paths: Iterable[str]) -> Any:
    """The aiohttp middleware that enforces the tokens."""
    open_set = frozenset(p.strip() for p in open_paths if p.strip())

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_set:
            return await handler(request)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        role = role_of(presented.strip(), tokens) if scheme.lower() == "bearer" and presented else None
        if role is None:
            return _error(401, "unauthorized", "this API needs a valid token: Authorization: Bearer <token>")
        needed = required_role(request.method, request.path)
        if RANK[role] < RANK[needed]:
            return _error(403, "forbidden", f"{request.method} {request.path} needs the {needed} role; "
                                            f"this token has the {role} role")
        return await handler(request)

    return authenticate


__all__ = ["ApiTokensError", "ROLES", "Token", "middleware", "parse_tokens", "required_role", "role_of"]
