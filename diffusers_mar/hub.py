"""Whether the Hugging Face Hub can be reached, asked once and fast, so that a wrong id or a machine without network
fails in a second with a clear message instead of after `huggingface_hub`'s retries (five, about 25 s)."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from huggingface_hub import constants


def hub_unreachable_reason() -> str | None:
    """Why the Hub cannot be reached (`HF_HUB_OFFLINE` is set, or its host name does not resolve), or `None` when a
    download may be tried. One name lookup, no HTTP request and no retry."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set"
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return f"HF_ENDPOINT {constants.ENDPOINT!r} names no host"
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except OSError as error:
        return f"{host} cannot be resolved: {error.strerror or error}"
    return None
