"""The Python client of Paperclip Core's gateway: the generated stubs (``paperclip.*``)
and :class:`PaperclipClient`, a typed async client whose failed calls raise the
suite's errors (``paperclip_client.errors``)."""

from paperclip_client.client import (
    API_URL_ENV,
    DEFAULT_TIMEOUT_SECONDS,
    GATEWAY_HEALTH_SERVICE,
    IDEMPOTENT_METHODS,
    LONG_RUNNING_METHODS,
    PUBLIC_SERVICES,
    REQUEST_ID_HEADER,
    STREAM_TIMEOUT_SECONDS,
    TOKEN_ENV,
    PaperclipClient,
    build_service_config,
    channel_options,
    method_path,
)
from paperclip_client.errors import ConfigError, PaperclipError

__all__ = [
    "API_URL_ENV",
    "DEFAULT_TIMEOUT_SECONDS",
    "GATEWAY_HEALTH_SERVICE",
    "IDEMPOTENT_METHODS",
    "LONG_RUNNING_METHODS",
    "PUBLIC_SERVICES",
    "REQUEST_ID_HEADER",
    "STREAM_TIMEOUT_SECONDS",
    "TOKEN_ENV",
    "ConfigError",
    "PaperclipClient",
    "PaperclipError",
    "build_service_config",
    "channel_options",
    "method_path",
]
