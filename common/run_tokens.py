"""Agent run tokens: HS256 JWTs the run service mints for one run.

A token names the agent (``sub``), its company and the run, and expires. Expiry only
bounds a leaked token: the gateway also refuses a token whose run has finished, so a
token dies with its run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from common.errors import Unauthenticated

ISSUER = "paperclip"
ALGORITHM = "HS256"
#: Long enough for the longest run; the run's end revokes it sooner.
DEFAULT_TTL_SECONDS = 48 * 3600
_REQUIRED = ("sub", "company_id", "run_id", "exp", "iat", "iss")


@dataclass(frozen=True)
class RunToken:
    """The verified claims of a run token."""

    agent_id: str
    company_id: str
    run_id: str
    expires_at: int


def mint_run_token(
    secret: bytes,
    *,
    agent_id: str,
    company_id: str,
    run_id: str,
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
    now: float | None = None,
) -> str:
    """A signed token for one run of one agent."""
    issued = int(now if now is not None else time.time())
    claims = {
        "sub": agent_id,
        "company_id": company_id,
        "run_id": run_id,
        "iat": issued,
        "exp": issued + ttl_seconds,
        "iss": ISSUER,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def looks_like_jwt(token: str) -> bool:
    """Whether ``token`` has the three dot-separated parts of a JWT."""
    return token.count(".") == 2


def verify_run_token(secret: bytes, token: str) -> RunToken:
    """The claims of a valid token; ``Unauthenticated`` with a reason otherwise."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": list(_REQUIRED)},
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthenticated("run token has expired", reason="RUN_TOKEN_EXPIRED") from exc
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"invalid run token: {exc}", reason="UNAUTHENTICATED") from exc
    values = [claims.get(name) for name in ("sub", "company_id", "run_id")]
    if not all(isinstance(v, str) and v for v in values):
        raise Unauthenticated("run token lacks agent, company or run", reason="UNAUTHENTICATED")
    agent_id, company_id, run_id = (str(v) for v in values)
    return RunToken(agent_id, company_id, run_id, int(claims["exp"]))
