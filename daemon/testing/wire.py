"""The wire: a free TCP port, and one Unix-socket HTTP connection (the client's own, with what tests and the fuzzer add)."""

from __future__ import annotations

import contextlib
import http.client
import os
import socket

from daemon.client.transport import UnixConnection


def free_port() -> int:
    """A TCP port of 127.0.0.1 free at this instant."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UnixHTTP(UnixConnection):
    """A keep-alive HTTP connection over a Unix socket: the client's own, plus ``get`` (a 200's body)
    and ``exchange`` (raw bytes out, one answer read back by content-length, for the fuzzer)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0):
        super().__init__(os.fspath(path), timeout)

    def get(self, url: str) -> bytes:
        self.request("GET", url)
        response = self.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {url}: {response.status} {body[:200]!r}")
        return body

    def exchange(self, raw: bytes, half_close: bool = False) -> tuple[int, dict[str, str], bytes] | None:
        """Send ``raw``, read one answer: (status, lower-case headers, body); None if the peer
        closed the connection without one."""
        if self.sock is None:
            self.connect()
        sock = self.sock
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)  # else it answered and closed before reading everything (a refused huge body)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock, method="GET")  # read the body by content-length, whatever was sent
        try:
            response.begin()
            body = response.read()
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected, http.client.IncompleteRead):
            self.close()
            return None
        headers = {k.lower(): v for k, v in response.getheaders()}
        if response.will_close or half_close:
            self.close()
        return response.status, headers, body
