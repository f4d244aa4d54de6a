"""Listening sockets that keep latency low.

asyncio turns on TCP_NODELAY for accepted connections only when the listening socket
says ``IPPROTO_TCP``; a socket made with protocol 0 (as uvicorn makes them for
``--workers``) leaves Nagle's algorithm on, and every response whose headers and body
go out in two writes then waits ~40 ms for the client's delayed ACK (measured).
"""

from __future__ import annotations

import socket


def listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
