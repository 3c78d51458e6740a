"""Answering the requests waiting on a held listening socket when a wake cannot serve them: the only
HTTP the daemon speaks on a model's own socket (a built-in service's port or ``bind_unix`` socket).

When a scaled-to-zero service's wake fails (503) or takes longer than ``wake_timeout`` (504), the
connections in the socket's backlog are accepted here, one by one, and each gets::

    HTTP/1.1 <status> ...
    content-type: application/json
    connection: close

    {"error": {"type": "ServiceUnavailable" | "GatewayTimeout", "message": "..."}}

Each request answered is counted as the built-in server would count it (``observe``: in the
service's ``direct`` request counters), unless it came through the gateway (which counts its own
answers) or is one of the daemon's probes.

A socket closed with unread data sends a reset, not the answer: the request head is read first
(``HEAD_TIMEOUT`` at most), and after the answer the write side is shut and what the client still
sends (a body) is read and dropped until it closes (``LINGER`` at most). Bounded: at most
``MAX_AT_ONCE`` connections are answered at once, heads of ``MAX_HEAD`` bytes at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable

from .runtime._serve.counters import CLIENT_GONE, PROBE_HEADER, VIA_GATEWAY

log = logging.getLogger("modeld.manager")

MAX_AT_ONCE = 64
MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 2.0
LINGER = 2.0
REASONS = {503: "Service Unavailable", 504: "Gateway Timeout"}


def response(status: int, error_type: str, message: str) -> bytes:
    body = json.dumps({"error": {"type": error_type, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


async def answer_waiting(
    listener: socket.socket, status: int, error_type: str, message: str, observe: Callable[[int], None] | None = None
) -> int:
    """Accept every connection waiting on ``listener`` now and answer each ``status`` (see the module
    docstring), calling ``observe`` with the status of each request counted directly (499 for a
    client that closed its side before its answer, which is still sent); the number answered."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    data = response(status, error_type, message)
    slots = asyncio.Semaphore(MAX_AT_ONCE)
    tasks: set[asyncio.Task[None]] = set()
    answered = 0
    while True:
        await slots.acquire()
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            slots.release()
            break
        except OSError as exc:  # the daemon out of fds, say: what is left waits for the next answer
            slots.release()
            log.warning("cannot accept a waiting connection: %s", exc)
            break
        answered += 1
        task = loop.create_task(_answer_one(loop, conn, data, status, observe))
        task.add_done_callback(lambda _t: slots.release())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    return answered


def _gone(conn: socket.socket) -> bool:
    """Whether the client has closed its side: reads what it has sent until the end (gone) or until
    nothing more is there (still waiting for its answer)."""
    try:
        while conn.recv(65536, socket.MSG_DONTWAIT):
            pass
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def counted_directly(head: bytes) -> bool:
    """Whether a request with this head is counted here: not if the gateway sent it, nor a probe."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == PROBE_HEADER or (name == b"via" and VIA_GATEWAY in value):
            return False
    return True


async def _answer_one(
    loop: asyncio.AbstractEventLoop,
    conn: socket.socket,
    data: bytes,
    status: int,
    observe: Callable[[int], None] | None,
) -> None:
    with conn, contextlib.suppress(OSError, TimeoutError):
        conn.setblocking(False)
        head = b""
        async with asyncio.timeout(HEAD_TIMEOUT):
            while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                chunk = await loop.sock_recv(conn, 4096)
                if not chunk:
                    return  # the client gave up: nothing to answer
                head += chunk
        if observe is not None and counted_directly(head):
            # 499 for a client that closed its side while it waited (as the built-in server counts it); it is
            # still answered, in case it closed only its sending side and reads on
            observe(CLIENT_GONE if _gone(conn) else status)
        await loop.sock_sendall(conn, data)
        conn.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(LINGER):  # read what is left until the client closes: no reset
            while await loop.sock_recv(conn, 65536):
                pass
