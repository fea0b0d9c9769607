"""Tokens: HS256 JWTs (``sub`` = user id, ``exp``, optional ``cid`` = clientId, optional ``admin``).

They come in the STOMP CONNECT frame (``Authorization: Bearer <t>``, ``passcode`` or ``token``: browsers cannot
set headers on the WebSocket handshake) or as HTTP ``Authorization: Bearer``. ``--auth open`` reproduces the
original design's trust-the-clientId behaviour (the clientId *is* the user): for local development only.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import jwt

log = logging.getLogger(__name__)

ALGORITHM = "HS256"
DEFAULT_TTL = 24 * 60 * 60  # seconds
MAX_ID_LENGTH = 128  # user ids and clientIds


class AuthError(Exception):
    """The credentials are missing or invalid; ``str(exc)`` is safe to show to the client."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    client_id: str | None = None  # the token's ``cid``: when set, the connection must use this clientId
    admin: bool = False


def valid_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and value.isprintable() and ":" not in value


class Authenticator:
    def __init__(self, secret: bytes, *, mode: str = "token") -> None:
        if mode not in ("token", "open"):
            raise ValueError(f"auth mode must be 'token' or 'open', not {mode!r}")
        if len(secret) < 16:
            raise ValueError("the token secret must be at least 16 bytes")
        self.mode = mode
        self._secret = secret

    @property
    def open(self) -> bool:
        return self.mode == "open"

    def issue(
        self, user_id: str, *, client_id: str | None = None, ttl: float = DEFAULT_TTL, admin: bool = False
    ) -> str:
        if not valid_id(user_id):
            raise ValueError(f"invalid user id {user_id!r}")
        claims: dict[str, object] = {"sub": user_id, "iat": int(time.time()), "exp": int(time.time() + ttl)}
        if client_id is not None:
            claims["cid"] = client_id
        if admin:
            claims["admin"] = True
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(token, self._secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        sub, cid = claims.get("sub"), claims.get("cid")
        if not valid_id(sub) or (cid is not None and not valid_id(cid)):
            raise AuthError("invalid token: bad sub or cid")
        return Principal(sub, cid, bool(claims.get("admin", False)))

    def authenticate(self, token: str | None, client_id: str | None) -> Principal:
        """The principal for a token (token mode) or a clientId (open mode); ``client_id`` must fit the token."""
        if self.open:
            if token:
                return self.verify(token)
            if not valid_id(client_id):
                raise AuthError("a clientId is required (auth mode 'open')")
            return Principal(client_id, client_id)
        if not token:
            raise AuthError("missing token")
        principal = self.verify(token)
        if principal.client_id is not None and client_id is not None and client_id != principal.client_id:
            raise AuthError("clientId does not match the token")
        return principal


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (None when absent or another scheme)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def load_secret(data_dir: str | os.PathLike[str]) -> bytes:
    """``GATEWAY_SECRET``, or ``DATA/secret`` (created on first use, mode 0600)."""
    env = os.environ.get("GATEWAY_SECRET")
    if env:
        return env.encode()
    path = Path(data_dir) / "secret"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(value + b"\n")
    log.info("created token secret %s", path)
    return value
