"""Origin checks as ComfyUI's middleware does them, and the Hypercorn listener."""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse

from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets


def _is_loopback(host: str | None) -> bool:
    """ComfyUI's is_loopback, without DNS: loopback addresses and "localhost"."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _origin_forbidden(host: str | None, origin: str | None) -> bool:
    """ComfyUI's origin_only_middleware: for a loopback Host, Origin's host:port must equal Host's."""
    if not host or not origin:
        return False
    try:
        host_domain = host.lower()
        parsed_origin = urllib.parse.urlparse(origin)
        origin_domain = parsed_origin.netloc.lower()
        parsed_host = urllib.parse.urlsplit("//" + host_domain)
        if parsed_origin.port is None:  # browsers may omit default ports: compare host names only
            host_domain = parsed_host.hostname or ""
        if parsed_host.port is None:
            origin_domain = parsed_origin.hostname or ""
        loopback = _is_loopback(parsed_host.hostname)
    except ValueError:  # a port that is not a number: ComfyUI fails too (500); refusing is close enough
        return True
    return loopback and bool(host_domain) and bool(origin_domain) and host_domain != origin_domain


class _ListenerConfig(HypercornConfig):
    """Remembers the listening sockets hypercorn creates, so a killed server frees its port at once."""

    def __init__(self) -> None:
        super().__init__()
        self.listening: list[socket.socket] = []

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()  # SO_REUSEADDR is set: rebinding right after a kill works
        self.listening.extend(sockets.insecure_sockets)
        return sockets

    def close_listening(self) -> None:
        for sock in self.listening:
            sock.close()
        self.listening.clear()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
