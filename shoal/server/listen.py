"""The server's listening socket, bound before anything slow happens."""

from __future__ import annotations

import errno
import socket


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (uvicorn listens on it). ValueError, in one line naming
    the address, when the host does not resolve or the port is taken, so ``shoal serve`` fails
    before it spends seconds loading a model."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"cannot listen on {host}:{port}: the host does not resolve ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        hint = "; is another server running there? choose another --port" if exc.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    sock.set_inheritable(True)
    return sock
