"""The connection to the Ray cluster, with every call bounded by a deadline.

Ray bounds none of this itself: ``ray.init("<host>:<dead port>")`` waits for minutes, a
listener that accepts and never answers holds it forever, and ``serve.run`` waits for the
application with no timeout. So each call runs in a daemon thread the caller waits for
until its deadline, and the first connection is checked before ``ray.init``: a TCP
connect (a refused port fails at once) and a gRPC handshake (GCS and the Ray client server
both speak gRPC: a listener that never answers fails when the deadline passes), each error
naming the address. A process's driver is connected to one cluster at a time (Ray's rule).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from daemon.exceptions import FlavorError, ModeldError
from deployers.ray.flavor import ClusterUnreachable

T = TypeVar("T")
RECONNECT_FOREVER = 10**9  # seconds (Ray's setting is unsigned 32-bit)


class Deadline:
    def __init__(self, timeout: float) -> None:
        self.timeout = float(timeout)
        self.end = time.monotonic() + self.timeout

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def bounded(fn: Callable[[], T], seconds: float, what: str, error: type[ModeldError] = ClusterUnreachable) -> T:
    """``fn()`` in a daemon thread; ``error`` naming ``what`` if it has not returned within ``seconds``.

    A call cut off goes on in its thread (Ray's calls cannot be cancelled) and its result is dropped.
    """
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the waiting caller, who raises it)
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"modeld-ray {what}"[:60], daemon=True).start()
    if not done.wait(max(seconds, 0.0)):
        _DRIVER.suspect = True
        raise error(f"{what}: no answer within {seconds:.3g}s")
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def host_port(address: str) -> tuple[str, int]:
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def resolve(address: str) -> str:
    """``auto`` as Ray resolves it (the address file of the head started on this machine)."""
    if address != "auto":
        return address
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except Exception as exc:  # Ray raises ConnectionError and others; all mean "none found"
        raise ClusterUnreachable(f"address 'auto': no Ray head found on this machine ({exc})") from exc
    if not found:
        raise ClusterUnreachable("address 'auto': no Ray head found on this machine (start one with `ray start --head`)")
    return str(found)


def preflight(address: str, deadline: Deadline) -> None:
    """Fail fast, naming ``address``, unless something there completes a gRPC handshake in time."""
    host, port = host_port(address)
    try:
        socket.create_connection((host, port), timeout=max(0.01, min(deadline.left(), 10.0))).close()
    except OSError as exc:
        raise ClusterUnreachable(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from exc
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=deadline.left())
    except grpc.FutureTimeoutError:
        raise ClusterUnreachable(
            f"the Ray cluster at {address} accepted a connection but did not answer within {deadline.timeout:g}s "
            "(no gRPC handshake: is it a Ray GCS, host:port, or a Ray client server, ray://host:port?)"
        ) from None
    finally:
        channel.close()


def _not_the_thread_note(record: logging.LogRecord) -> bool:
    return "SIGTERM handler is not set" not in record.getMessage()


def quiet_ray() -> None:
    """Ray's driver-side notes that say nothing to a user of modeld, kept off stderr: the warning that
    ``ray.init`` in a thread (see ``connect``) sets no SIGTERM handler, and Serve's INFO lines
    ("Connecting to existing Serve app ...", on every ``serve.run``). Ray's warnings and errors stay."""
    worker = logging.getLogger("ray._private.worker")
    if _not_the_thread_note not in worker.filters:
        worker.addFilter(_not_the_thread_note)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


@dataclass
class _Driver:
    """This process's connection (one per process, as Ray's driver is)."""

    address: str | None = None  # as configured
    connecting: threading.Event | None = None  # set when the ray.init in flight ends
    error: BaseException | None = None  # what that ray.init raised
    serve: tuple[str, int] | None = None  # the proxy Serve was checked to have
    suspect: bool = False  # a call went unanswered: check the cluster, and connect again, before the next
    lock: threading.Lock = field(default_factory=threading.Lock)


_DRIVER = _Driver()


def connect(address: str, namespace: str, deadline: Deadline) -> None:
    """Connect this process's driver to ``address`` within the deadline (once; later calls return at once).

    A ``ray.init`` cut off by the deadline goes on in its thread; the next call waits for it again.
    """
    import ray

    driver = _DRIVER
    with driver.lock:
        if driver.address is not None and driver.address != address:
            raise FlavorError(
                f"this process is connected to the Ray cluster at {driver.address}; a process drives one cluster at a "
                f"time (Ray's driver), so {address} needs another process"
            )
        if driver.connecting is None:
            if driver.address == address and ray.is_initialized() and not driver.suspect:
                return
            preflight(resolve(address), deadline)
            if ray.is_initialized():  # suspect, and answering again (a new head?): a new driver
                bounded(ray.shutdown, deadline.left(), f"disconnecting from the Ray cluster at {address}")
            driver.suspect = False
            _forget_serve_client()
            # Ray ends a process whose driver has not reached its GCS for 60 s ("The program will
            # terminate"); a deployer's caller must outlive its cluster: its calls fail, bounded, instead.
            os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(RECONNECT_FOREVER))
            quiet_ray()
            done = threading.Event()
            driver.address, driver.connecting, driver.error, driver.serve = address, done, None, None

            def init() -> None:
                try:
                    ray.init(
                        address=address,
                        namespace=namespace,
                        log_to_driver=False,
                        logging_level=logging.WARNING,
                        ignore_reinit_error=True,
                    )
                except BaseException as exc:  # noqa: BLE001  (kept for the caller)
                    driver.error = exc
                finally:
                    done.set()

            threading.Thread(target=init, name="modeld-ray connect", daemon=True).start()
        if not driver.connecting.wait(deadline.left()):
            raise ClusterUnreachable(f"connecting to the Ray cluster at {address}: no answer within {deadline.timeout:g}s")
        driver.connecting = None
        if driver.error is not None or not ray.is_initialized():
            cause, driver.error, driver.address = driver.error, None, None
            raise ClusterUnreachable(f"cannot connect to the Ray cluster at {address}: {cause}") from cause


def ensure_serve(address: str, proxy_host: str, proxy_port: int, deadline: Deadline) -> None:
    """Start Serve with this proxy if it is not running; refuse if it runs with another one."""
    driver = _DRIVER
    if driver.serve == (proxy_host, proxy_port):
        return
    from ray import serve
    from ray.serve.context import _get_global_client

    def start() -> tuple[str, int]:
        serve.start(http_options={"host": proxy_host, "port": proxy_port})
        config = _get_global_client().http_config
        return str(config.host), int(config.port)

    actual = bounded(start, deadline.left(), f"starting Ray Serve on the cluster at {address}")
    if actual != (proxy_host, proxy_port):
        raise FlavorError(
            f"Ray Serve on the cluster at {address} has its HTTP proxy on {actual[0]}:{actual[1]}, fixed by whoever "
            f"started Serve there first; this deployer says proxy_host={proxy_host} proxy_port={proxy_port}: register it "
            f"again with proxy_host={actual[0]} proxy_port={actual[1]} (or restart the cluster)"
        )
    driver.serve = actual


def applications(address: str, deadline: Deadline) -> dict[str, Any]:
    """Serve's applications by name (``ApplicationStatusOverview`` each), asked within the deadline."""
    from ray import serve

    status = bounded(serve.status, deadline.left(), f"asking Ray Serve on {address} for its applications")
    return dict(status.applications)


def disconnect(timeout: float = 30.0) -> None:
    """End this process's driver (``ray.shutdown``); the next call connects again."""
    import ray

    with _DRIVER.lock:
        _DRIVER.address, _DRIVER.connecting, _DRIVER.serve = None, None, None
        _forget_serve_client()
        if ray.is_initialized():
            bounded(ray.shutdown, timeout, "disconnecting from the Ray cluster")


def _forget_serve_client() -> None:
    """Drop Serve's cached controller handle: Serve keeps it across ``ray.shutdown`` and tells sessions apart
    by job id, which a new head numbers from 1 again, so it would take a dead controller for the new one's."""
    from ray.serve import context

    context._set_global_client(None)


def session_dir() -> str | None:
    """The session folder of the node this driver runs on, when it is a node of the cluster (not ray://)."""
    try:
        from ray._private import worker

        node = worker.global_worker.node
        return str(node.get_session_dir_path()) if node is not None else None
    except Exception:  # noqa: BLE001  (a Ray client driver has no node: the logs are out of reach)
        return None
