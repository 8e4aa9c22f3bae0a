"""Per-request values set by the interceptor and read by servicers and log lines."""

from __future__ import annotations

from contextvars import ContextVar

from common.actor import Actor
from common.errors import Unauthenticated

CURRENT_ACTOR: ContextVar[Actor | None] = ContextVar("paperclip_actor", default=None)
REQUEST_ID: ContextVar[str] = ContextVar("paperclip_request_id", default="")


def current_actor() -> Actor:
    """The verified actor of the request being served."""
    actor = CURRENT_ACTOR.get()
    if actor is None:
        raise Unauthenticated("no verified actor for this call")
    return actor
