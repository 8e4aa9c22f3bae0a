"""The database URL forms the suite accepts, and the conversions between what
SQLAlchemy's asyncpg engine and ``asyncpg.connect`` each expect."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

ASYNC_SCHEME = "postgresql+asyncpg"
LIBPQ_SCHEME = "postgresql"
_ACCEPTED_SCHEMES = ("postgresql", "postgres", ASYNC_SCHEME)


def normalize_database_url(url: str) -> str:
    """Return ``url`` in the ``postgresql+asyncpg://`` form SQLAlchemy's engine needs.

    Accepts ``postgresql://``, ``postgres://`` and ``postgresql+asyncpg://``; libpq's
    ``sslmode`` query parameter becomes asyncpg's ``ssl``.
    """
    rest = _strip_scheme(url)
    return f"{ASYNC_SCHEME}://{_rename_query_param(rest, 'sslmode', 'ssl')}"


def asyncpg_dsn(url: str) -> str:
    """Return ``url`` as a plain ``postgresql://`` DSN for ``asyncpg.connect``."""
    rest = _strip_scheme(url)
    return f"{LIBPQ_SCHEME}://{_rename_query_param(rest, 'ssl', 'sslmode')}"


def redact_database_url(url: str) -> str:
    """Return ``url`` with any password (userinfo or query) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    base, qsep, query = rest.partition("?")
    authority, slash, path = base.partition("/")
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        authority = f"{user}:***@{host}" if has_password else authority
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key == "password" for key, _ in pairs):
        hidden = [(key, "***" if key == "password" else value) for key, value in pairs]
        query = urlencode(hidden, safe="/*")
    return f"{scheme}{sep}{authority}{slash}{path}{qsep}{query}"


def _strip_scheme(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _ACCEPTED_SCHEMES:
        accepted = ", ".join(f"{s}://" for s in _ACCEPTED_SCHEMES)
        raise ValueError(f"unsupported database URL scheme {scheme!r}: expected {accepted}")
    return rest


def _rename_query_param(rest: str, old: str, new: str) -> str:
    base, sep, query = rest.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    if not sep or all(key != old for key, _ in pairs):
        return rest
    renamed = [(new if key == old else key, value) for key, value in pairs]
    return f"{base}?{urlencode(renamed, safe='/')}"
