"""modeld built-in model server (KServe V1 data plane): everything but the entry point.

Loaded by ``serve.py`` (see there for the command line, exit codes and why the
split), under the user's interpreter: only the standard library and uvicorn are
imported here, since every import adds start-up latency and the daemon's own
package is not importable from the user's interpreter.
"""

import argparse
import asyncio
import json
import os
import socket
import sys

import uvicorn

MAX_BODY = 64 * 1024 * 1024
DEFAULT_ATTR = "model"
EXIT_USAGE = 2
EXIT_LOAD = 3


def _log(msg):
    print(f"modeld: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Model loading


def _import_file(path):
    import importlib.util

    if not os.path.isfile(path) and os.path.isfile(path + ".py"):
        path += ".py"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    stem = os.path.splitext(os.path.basename(path))[0]
    # Register under the stem (so pickling/dataclasses of its classes work),
    # unless that would shadow a module that is already imported.
    name = stem if stem.isidentifier() and stem not in sys.modules else f"_modeld_model_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Like running the file as a script: its siblings are importable.
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(1, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _load_python(uri):
    target, sep, attr = uri.rpartition(":")
    if not sep:
        target, attr = uri, DEFAULT_ATTR
    if not target:
        raise ValueError("expected 'package.module:attr' or 'path/to/file.py:attr'")
    if not attr:
        raise ValueError(f"empty attribute name after ':' (expected e.g. '{target}:{DEFAULT_ATTR}')")
    if target.endswith(".py") or "/" in target or os.sep in target:
        module = _import_file(os.path.abspath(target))
    else:
        import importlib

        module = importlib.import_module(target)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            hint = f" (pass the object as '{target}:attr')" if not sep else ""
            raise AttributeError(f"'{target}' has no attribute '{attr}'{hint}") from None
    return obj


def _load_pickle(uri):
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    path = os.path.abspath(path)
    if path.endswith(".joblib"):
        try:
            import joblib
        except ImportError as exc:
            raise ModuleNotFoundError(
                f"loading .joblib models needs the 'joblib' package, which is not installed for {sys.executable}"
            ) from exc
        return joblib.load(path)
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)


def load_model(uri, model_type):
    """Return a callable taking the list of instances and returning predictions."""
    obj = _load_python(uri) if model_type == "python" else _load_pickle(uri)
    if isinstance(obj, type):
        obj = obj()
    predict = getattr(obj, "predict", None)
    if callable(predict):
        return predict
    if callable(obj):
        return obj
    raise TypeError(f"model object of type {type(obj).__name__} is neither callable nor has a .predict() method")


# --------------------------------------------------------------------------
# ASGI application


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _json_default(obj):
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _error(exc):
    return f"{type(exc).__name__}: {exc}"


class _Disconnected(Exception):
    pass


class App:
    def __init__(self, name, predict):
        self.name = name
        self.predict = predict
        self.draining = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        started = False

        async def respond(status, obj, close=False, allow=None):
            nonlocal started
            body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if allow:
                headers.append((b"allow", allow.encode()))
            if close or self.draining:
                # While draining, tell keep-alive clients to reconnect (and so
                # reach the process that keeps serving).
                headers.append((b"connection", b"close"))
            started = True
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        try:
            await self._route(scope, receive, respond)
        except _Disconnected:
            pass
        except Exception as exc:  # a bug here must still give a JSON answer
            import traceback

            traceback.print_exc()
            if not started:
                await respond(500, {"error": f"internal server error: {_error(exc)}"})

    async def _route(self, scope, receive, respond):
        method, path = scope["method"], scope["path"]

        def wrong_method(allowed):
            return respond(405, {"error": f"method {method} not allowed for {path}; use {allowed}"}, allow=allowed)

        if path == "/health":
            if method != "GET":
                return await wrong_method("GET")
            return await respond(200, {"status": "ok"})
        if path in ("/v1/models", "/v1/models/"):
            if method != "GET":
                return await wrong_method("GET")
            return await respond(200, {"models": [self.name]})
        prefix = "/v1/models/"
        if path.startswith(prefix):
            rest = path[len(prefix):]
            if rest.endswith(":predict"):
                if method != "POST":
                    return await wrong_method("POST")
                name = rest[: -len(":predict")]
                if name != self.name:
                    return await self._not_found(name, respond)
                return await self._predict(scope, receive, respond)
            if "/" not in rest and ":" not in rest:
                if method != "GET":
                    return await wrong_method("GET")
                if rest != self.name:
                    return await self._not_found(rest, respond)
                return await respond(200, {"name": self.name, "ready": True})
        return await respond(404, {"error": f"not found: {path}"})

    async def _not_found(self, name, respond):
        await respond(404, {"error": f"model '{name}' not found; this server serves '{self.name}'"})

    async def _predict(self, scope, receive, respond):
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    too_big = int(value) > MAX_BODY
                except ValueError:
                    too_big = False
                if too_big:
                    return await respond(413, {"error": f"request body larger than {MAX_BODY} bytes"}, close=True)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                return await respond(413, {"error": f"request body larger than {MAX_BODY} bytes"}, close=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        try:
            payload = json.loads(b"".join(chunks))
        except ValueError as exc:
            return await respond(400, {"error": f"request body is not valid JSON: {exc}"})
        if not isinstance(payload, dict):
            return await respond(
                400, {"error": f'request body must be a JSON object {{"instances": [...]}}, got {_json_type(payload)}'}
            )
        if "instances" not in payload:
            return await respond(400, {"error": 'request body has no "instances" field; expected {"instances": [...]}'})
        instances = payload["instances"]
        if not isinstance(instances, list):
            return await respond(400, {"error": f'"instances" must be a list, got {_json_type(instances)}'})

        try:
            # In a worker thread: health probes stay responsive during a slow predict.
            result = await asyncio.to_thread(self.predict, instances)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            import traceback

            traceback.print_exc()
            _log(f"predict failed: {_error(exc)}")
            return await respond(500, {"error": _error(exc)})

        try:
            if callable(getattr(result, "tolist", None)):
                result = result.tolist()
            elif isinstance(result, tuple):
                result = list(result)
            body = json.dumps({"predictions": result}, default=_json_default, allow_nan=False).encode()
        except Exception as exc:
            return await respond(500, {"error": f"model output is not JSON-serialisable: {_error(exc)}"})
        await respond(200, body)


# --------------------------------------------------------------------------
# Server


class Server(uvicorn.Server):
    """uvicorn server whose first SIGTERM/SIGINT stops accepting, drains, then exits promptly.

    Stock uvicorn resets connections it accepted but has not parsed yet when
    the signal arrives. Here the listening sockets are closed first (the kernel
    backlog stays with any other process sharing the TCP fd, e.g. the next
    version during a hand-over), and uvicorn's shutdown starts once no
    connection has been open for ``QUIET`` seconds, or after ``drain`` seconds
    at most (idle keep-alive clients). A stop with no request in flight thus
    takes a few ms, not the whole drain. uvicorn's own loop wakes every 0.1 s
    and its shutdown polls every 0.1 s; both are replaced so the exit follows
    at once. A second signal forces the exit. Captured signals are not
    re-raised, so a graceful stop exits 0.
    """

    QUIET = 0.02  # seconds with no open connection that end a drain early
    POLL = 0.005

    def __init__(self, config, app, drain, on_drain=None, on_started=None):
        super().__init__(config)
        self.app = app
        self.drain = drain
        self.on_drain = on_drain
        self.on_started = on_started
        self.loop = None
        self.draining = False
        self._wake = None
        self._drain_deadline = 0.0
        self._quiet_since = None

    async def serve(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await super().serve(sockets=sockets)

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def main_loop(self):
        # uvicorn's loop, but woken at once when it should exit instead of at its next tick, and
        # ticking once a second instead of ten times: the exit has its own wake-up, and what
        # uvicorn does on a tick (the Date header) it does every tenth one. An idle server then
        # costs the machine one wake-up a second (a thousand of them: a thousand, not ten thousand).
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def shutdown(self, sockets=None):
        # uvicorn's shutdown without its fixed 0.1 s sleep and 0.1 s polls.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        deadline = self.loop.time() + self.config.timeout_graceful_shutdown
        state = self.server_state
        while (state.connections or state.tasks) and not self.force_exit and self.loop.time() < deadline:
            await asyncio.sleep(self.POLL)
        for task in state.tasks:
            task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()

    def _exit_now(self):
        self.should_exit = True
        if self._wake is not None:
            self._wake.set()

    def handle_exit(self, sig, frame):
        # Never appended to self._captured_signals: nothing is re-raised later.
        if self.draining or self.should_exit:
            self.should_exit = True
            self.force_exit = True
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self._exit_now)
            return
        self.draining = True
        if self.loop is None or not self.started:
            self.should_exit = True
            return
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self):
        self.app.draining = True
        servers = list(getattr(self, "servers", ()))
        # Stop accepting now, but close the listening sockets one loop iteration
        # later: connections accepted just before still have their transport-
        # creation tasks queued, and asyncio (3.11) silently drops them (leaking
        # the socket until exit, when the client sees a reset) if the server is
        # already closed when those tasks run. The ready queue is FIFO, so a
        # call_soon here runs after them.
        for server in servers:
            for sock in server.sockets:
                self.loop.remove_reader(sock.fileno())
        self.loop.call_soon(self._close_servers, servers)
        if self.on_drain is not None:
            self.on_drain()
        self._drain_deadline = self.loop.time() + self.drain
        self.loop.call_later(self.POLL, self._check_drain)

    def _close_servers(self, servers):
        for server in servers:
            server.close()

    def _check_drain(self):
        # An accepted connection reaches server_state.connections a few loop iterations
        # after its accept; QUIET (many iterations) covers that gap.
        now = self.loop.time()
        if self.server_state.connections:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = now
        if now >= self._drain_deadline or (self._quiet_since is not None and now - self._quiet_since >= self.QUIET):
            self._exit_now()
        else:
            self.loop.call_later(self.POLL, self._check_drain)


class FdHandoff:
    """Unix socket that hands our TCP listening fd to a same-uid peer (SCM_RIGHTS)."""

    def __init__(self, path, tcp_sock):
        self.path = path
        self.tcp_sock = tcp_sock
        self.sock = _bind_unix(path)
        self.sock.setblocking(False)
        self.ino = os.stat(path).st_ino
        self.loop = None

    def start(self, loop):
        self.loop = loop
        loop.add_reader(self.sock.fileno(), self._on_accept)

    def _on_accept(self):
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            _log(f"fd handoff: accept failed: {exc}")
            return
        with conn:
            try:
                if hasattr(socket, "SO_PEERCRED"):
                    import struct

                    size = struct.calcsize("3i")
                    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size))
                    if uid != os.getuid():
                        return
                fd = self.tcp_sock.fileno()
                if fd < 0:  # already closed while draining: nothing to hand over
                    return
                conn.settimeout(1.0)
                socket.send_fds(conn, [b"fd"], [fd])
            except OSError as exc:
                _log(f"fd handoff failed: {exc}")

    def close(self):
        if self.loop is not None and self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        _unlink_if_ours(self.path, self.ino)


def _bind_unix(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


def _unlink_if_ours(path, ino):
    # A newer process may have re-created the path already; leave that alone.
    try:
        if os.stat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass


def _tcp_socket(args):
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
        if sock.type != socket.SOCK_STREAM:
            raise OSError(f"fd {args.fd} is not a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(2048)
        return sock
    info = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return socket.create_server(info[0][4][:2], family=info[0][0], backlog=2048)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="serve.py", description="modeld built-in model server (KServe V1)")
    p.add_argument("--model-uri", required=True, help="module:attr, path/file.py:attr, or a .pkl/.pickle/.joblib file")
    p.add_argument("--model-type", required=True, choices=["python", "pickle"])
    p.add_argument("--model-name", default="model")
    p.add_argument("--fd", type=int, help="inherited, bound and listening TCP socket fd")
    p.add_argument("--host", help="bind this host instead of using --fd")
    p.add_argument("--port", type=int, help="bind this port instead of using --fd")
    p.add_argument("--unix", help="also serve on a private Unix socket at this path")
    p.add_argument("--fd-socket", help="Unix socket path handing the TCP listening fd to same-uid peers")
    p.add_argument("--drain", type=float, default=0.3,
                   help="at most this many seconds between stop-accepting and shutdown (less once no connection is open)")
    args = p.parse_args(argv)
    if args.fd is None and (args.host is None or args.port is None):
        p.error("either --fd or both --host and --port are required")
    if args.fd is not None and (args.host is not None or args.port is not None):
        p.error("--fd cannot be combined with --host/--port")
    if args.drain < 0:
        p.error("--drain must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    service = os.environ.get("MODELD_SERVICE_UUID", "")
    _set_title(f"{SERVER_NAME} {args.model_name} {service[:8]}".strip())
    try:
        tcp = _tcp_socket(args)
    except OSError as exc:
        where = f"--fd {args.fd}" if args.fd is not None else f"{args.host}:{args.port}"
        _log(f"cannot use {where}: {exc}")
        return EXIT_USAGE

    try:
        predict = load_model(args.model_uri, args.model_type)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        import traceback

        traceback.print_exc()
        message = str(exc).replace("\n", " ")
        _log(f"cannot load model '{args.model_uri}': {type(exc).__name__}: {message}")
        return EXIT_LOAD

    sockets = [tcp]
    unix_ino = handoff = None
    try:
        if args.unix:
            unix = _bind_unix(args.unix)
            unix_ino = os.stat(args.unix).st_ino
            sockets.append(unix)
        if args.fd_socket:
            handoff = FdHandoff(args.fd_socket, tcp)
    except OSError as exc:
        _log(f"cannot create unix socket: {exc}")
        return EXIT_USAGE

    app = App(args.model_name, predict)
    config = uvicorn.Config(
        app,
        http="h11",
        ws="none",
        lifespan="off",
        interface="asgi3",
        proxy_headers=False,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )

    def started():
        _log(f"serving model '{args.model_name}' ({args.model_uri}) pid {os.getpid()}")

    server = Server(config, app, args.drain, on_started=started)

    async def run():
        if handoff is not None:
            handoff.start(asyncio.get_running_loop())
        try:
            await server.serve(sockets=sockets)
        finally:
            if handoff is not None:
                handoff.close()
            if unix_ino is not None:
                _unlink_if_ours(args.unix, unix_ino)

    asyncio.run(run())
    return 0



# --------------------------------------------------------------------------
# Warm start: a fork server


def fork_server(control_fd):
    """Serve spawn requests from the daemon on ``control_fd``, forking a server for each.

    This process has imported uvicorn and this module already, so a forked
    server skips the ~100 ms of a cold interpreter start. It stays single-
    threaded with no event loop (forking is safe), and each child starts its
    own session, so a server is the leader of its own process group as a
    cold one is. Wire format, one SOCK_SEQPACKET message each:

        daemon -> us: JSON {"argv": [...], "env": {...}, "cwd": "..."} with two
                      fds (SCM_RIGHTS): the log file, the listening socket
        us -> daemon: JSON {"pid": N, "ticks": T} (T: start time in clock ticks)
        us -> daemon: JSON {"exit": N, "code": C} when child N exited (C < 0: signal)

    It exits when the daemon closes its end.
    """
    import gc
    import signal

    ctl = socket.socket(fileno=control_fd)
    children = set()
    records = {}  # pid -> its record file

    def reap(*_):
        for pid in list(children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                children.discard(pid)
                continue
            if done:
                children.discard(pid)
                _remove_record(records.pop(pid, None))
                code = os.waitstatus_to_exitcode(status)
                try:
                    ctl.send(json.dumps({"exit": pid, "code": code}).encode())
                except OSError:
                    pass

    signal.signal(signal.SIGCHLD, reap)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import ctypes  # noqa: F401  (imported once here: each forked server renames itself with it)

    gc.collect()
    gc.freeze()  # the pre-imported objects stay shared with the children (no copy-on-write by the GC)
    # Named once ready, just before saying so (in ps and /proc/<pid>/comm; the servers it forks
    # name themselves, see main): its name is a sign that it is ready.
    _set_comm(FORK_SERVER_NAME)
    ctl.send(b'{"ready": true}')
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 1 << 20, 4)
        except OSError:
            return 0
        if not msg:
            return 0  # the daemon is gone; running servers carry on in their own sessions
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _forked(ctl, json.loads(msg), fds)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
            children.add(pid)
            for fd in fds:
                os.close(fd)
            ticks = _start_ticks(pid)
            records[pid] = _write_record(json.loads(msg)["env"], pid, ticks)
            ctl.send(json.dumps({"pid": pid, "ticks": ticks}).encode())
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        reap()


FORK_SERVER_NAME = "modeld-fork"  # the fork server's process name (comm), so it is told from the servers it forks
SERVER_NAME = "modeld-serve"  # a built-in server's process name (comm); ps shows "modeld-serve <model> <uuid>"


def _set_comm(name):
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def _set_title(title):
    """Name this process in ps: ``comm`` (what ``ps -o comm``, top and pgrep show) and the command line.

    The command line is rewritten in place, in the memory the kernel shows as
    /proc/<pid>/cmdline (arg_start..arg_end of /proc/self/stat), as setproctitle does
    when the title fits; it is cut to the room the original arguments left. Where that
    cannot be done (no ctypes, an unexpected layout), only ``comm`` changes.
    """
    _set_comm(title.split(" ", 1)[0])
    try:
        import ctypes

        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48 and 49)
        room = end - start
        if room < 2:
            return
        text = title.encode(errors="replace")[: room - 1]
        ctypes.memmove(start, text + b"\0" * (room - len(text)), room)
    except (ImportError, OSError, ValueError, IndexError):
        pass


RECORD_TAGS = ("MODELD_HOME", "MODELD_SERVICE_UUID", "MODELD_PROCESS")


def _write_record(env, pid, ticks):
    """Say who a forked server is, in ``$MODELD_HOME/run/forked-<pid>``, before the daemon hears of it.

    A cold server's /proc/<pid>/environ carries the daemon's tags (its service
    uuid...), so a daemon killed before it wrote the pid file still finds it on
    restart. A forked one shows our environ instead; this file stands in for it
    (start ticks first, then the tags as environ has them, NUL-separated).
    """
    home = env.get("MODELD_HOME")
    if not home:
        return None
    path = os.path.join(home, "run", f"forked-{pid}")
    tags = b"\0".join(f"{k}={env[k]}".encode() for k in RECORD_TAGS if k in env)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"%d\n" % ticks + tags)
        finally:
            os.close(fd)
    except OSError as exc:
        print(f"modeld fork server: cannot write {path}: {exc}", file=sys.stderr, flush=True)
        return None
    return path


def _remove_record(path):
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def _start_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return -1


def _forked(ctl, request, fds):
    """In the child: become what a cold spawn would have been, then run the server."""
    import signal

    ctl.close()
    os.setsid()
    if request.get("cgroup"):
        # Into the service's cgroup before anything else runs here, the model's code above all:
        # from now on, everything this server starts is stopped with it.
        try:
            with open(request["cgroup"], "w") as f:
                f.write("0")
        except OSError as exc:
            _log(f"cannot enter the service's cgroup {request['cgroup']}: {exc}")
            return EXIT_USAGE
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    log_fd, listen_fd = fds
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for fd in (devnull, log_fd):
        os.close(fd)
    cwd = request.get("cwd") or os.getcwd()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = cwd  # serve.py put the working directory first; this child's is another
    argv = list(request["argv"])
    argv[argv.index("--fd") + 1] = str(listen_fd)
    return main(argv)
