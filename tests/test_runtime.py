"""Tests for daemon/runtime/serve.py, run as a real subprocess (as the daemon does)."""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest

from daemon.testing import UnixHTTP, WaitTimeout, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = os.path.join(ROOT, "daemon", "runtime", "serve.py")
SETOSA = [5.0, 3.4, 1.5, 0.2]
VIRGINICA = [6.7, 3.0, 5.4, 2.2]


def listening_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def request(conn, method, path, body=None, headers=None):
    """Send one request on ``conn`` and return (status, parsed JSON, headers); closes conn."""
    try:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.getheader("content-type") == "application/json"
        return resp.status, json.loads(data), resp
    finally:
        conn.close()


class Proc:
    """A serve.py subprocess on a TCP socket bound by the test (inherited by fd)."""

    def __init__(self, uri, model_type="python", name="m", cwd=ROOT, sock=None, fd_socket=False, extra=()):
        self.tmp = tempfile.mkdtemp(prefix="mdt", dir="/tmp")
        self.own_sock = sock is None
        self.sock = listening_socket() if sock is None else sock
        self.port = self.sock.getsockname()[1]
        self.unix = os.path.join(self.tmp, "s")
        self.fd_socket = os.path.join(self.tmp, "fd") if fd_socket else None
        self.name = name
        args = [sys.executable, SERVE, "--model-uri", uri, "--model-type", model_type, "--model-name", name]
        args += ["--fd", str(self.sock.fileno()), "--unix", self.unix, *extra]
        if self.fd_socket:
            args += ["--fd-socket", self.fd_socket]
        self.stderr_path = os.path.join(self.tmp, "stderr")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                args,
                cwd=cwd,
                pass_fds=(self.sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    @property
    def stderr(self):
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def tcp(self, timeout=5.0):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def wait_ready(self, timeout=10.0):
        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.stderr}")
            try:
                return request(UnixHTTP(self.unix, timeout=1.0), "GET", "/health")[0] == 200
            except OSError:
                return False

        try:
            wait_for(ready, timeout, what="the server to answer /health")
        except WaitTimeout:
            pytest.fail(f"server not ready after {timeout}s:\n{self.stderr}")
        return self

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running after {timeout}s:\n{self.stderr}")

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(5)
        if self.own_sock:
            self.sock.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def spawn():
    procs = []

    def _spawn(*args, **kwargs):
        p = Proc(*args, **kwargs)
        procs.append(p)
        return p

    try:
        yield _spawn
    finally:
        for p in procs:
            p.kill()


@pytest.fixture(scope="module")
def iris():
    p = Proc("examples/iris.py:model", name="iris")
    try:
        yield p.wait_ready()
    finally:
        p.kill()


@pytest.fixture
def tmpdir_short():
    d = tempfile.mkdtemp(prefix="mdm", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write(directory, name, source):
    path = os.path.join(directory, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(source))
    return path


# --------------------------------------------------------------------------
# iris: predict, health, metadata, bad requests


def test_predict_iris(iris):
    status, body, _ = request(iris.tcp(), "POST", "/v1/models/iris:predict", {"instances": [SETOSA, VIRGINICA]})
    assert status == 200
    assert body == {"predictions": ["setosa", "virginica"]}


def test_health_tcp_and_unix(iris):
    assert request(iris.tcp(), "GET", "/health")[:2] == (200, {"status": "ok"})
    assert request(UnixHTTP(iris.unix, timeout=5.0), "GET", "/health")[:2] == (200, {"status": "ok"})
    assert request(UnixHTTP(iris.unix, timeout=5.0), "POST", "/v1/models/iris:predict", {"instances": [SETOSA]})[:2] == (
        200,
        {"predictions": ["setosa"]},
    )
    assert os.stat(iris.unix).st_mode & 0o077 == 0


def test_model_metadata(iris):
    assert request(iris.tcp(), "GET", "/v1/models/iris")[:2] == (200, {"name": "iris", "ready": True})
    status, body, _ = request(iris.tcp(), "GET", "/v1/models/other")
    assert status == 404
    assert "'other'" in body["error"] and "'iris'" in body["error"]
    status, body, _ = request(iris.tcp(), "POST", "/v1/models/other:predict", {"instances": []})
    assert status == 404 and "'other'" in body["error"]


@pytest.mark.parametrize(
    "body, needle",
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"inputs": []}', '"instances"'),
        (b'{"instances": {"a": 1}}', "must be a list"),
        (b'{"instances": "abc"}', "must be a list"),
    ],
)
def test_bad_bodies(iris, body, needle):
    status, resp, _ = request(iris.tcp(), "POST", "/v1/models/iris:predict", body)
    assert status == 400
    assert needle in resp["error"]


def test_unknown_path_and_method(iris):
    status, body, _ = request(iris.tcp(), "GET", "/nope")
    assert status == 404 and "error" in body
    status, body, resp = request(iris.tcp(), "GET", "/v1/models/iris:predict")
    assert status == 405 and resp.getheader("allow") == "POST"
    assert request(iris.tcp(), "POST", "/health", b"")[0] == 405


def test_body_too_large(iris):
    conn = iris.tcp()
    try:
        conn.putrequest("POST", "/v1/models/iris:predict")
        conn.putheader("Content-Length", str(100 * 1024 * 1024))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        assert "error" in json.loads(resp.read())
    finally:
        conn.close()


# --------------------------------------------------------------------------
# Other model shapes, errors


def test_callable_model_errors_and_keeps_serving(spawn, tmpdir_short):
    write(
        tmpdir_short,
        "mymodels.py",
        """
        def handler(instances):
            if instances == ["boom"]:
                raise ValueError("boom happened")
            if instances == ["bad"]:
                return [object()]
            return tuple(x * 2 for x in instances)
        """,
    )
    p = spawn("mymodels:handler", cwd=tmpdir_short).wait_ready()
    path = "/v1/models/m:predict"
    assert request(p.tcp(), "POST", path, {"instances": [1, 2]})[:2] == (200, {"predictions": [2, 4]})
    status, body, _ = request(p.tcp(), "POST", path, {"instances": ["boom"]})
    assert status == 500 and body == {"error": "ValueError: boom happened"}
    status, body, _ = request(p.tcp(), "POST", path, {"instances": ["bad"]})
    assert status == 500 and "JSON" in body["error"]
    assert request(p.tcp(), "POST", path, {"instances": [3]})[:2] == (200, {"predictions": [6]})
    assert request(p.tcp(), "GET", "/health")[0] == 200
    assert "boom happened" in p.stderr


def test_class_is_instantiated_and_called_once_per_request(spawn, tmpdir_short):
    write(
        tmpdir_short,
        "sub/counter.py",
        """
        class Counter:
            def __init__(self):
                self.calls = 0

            def predict(self, instances):
                self.calls += 1
                return [[self.calls, len(instances)]]
        """,
    )
    p = spawn("sub/counter.py:Counter", cwd=tmpdir_short).wait_ready()
    path = "/v1/models/m:predict"
    assert request(p.tcp(), "POST", path, {"instances": [1, 2, 3]})[1] == {"predictions": [[1, 3]]}
    assert request(p.tcp(), "POST", path, {"instances": []})[1] == {"predictions": [[2, 0]]}


@pytest.mark.parametrize(
    "source, uri, needle",
    [
        ("raise RuntimeError('kaboom 42')\n", "broken.py:model", "kaboom 42"),
        ("model = None\n", "broken.py:missing", "missing"),
        ("class M:\n    def __init__(self):\n        raise OSError('no weights here')\n", "broken.py:M", "no weights"),
        ("model = 42\n", "broken.py:model", "neither callable"),
    ],
)
def test_load_failure_exits_3(spawn, tmpdir_short, source, uri, needle):
    write(tmpdir_short, "broken.py", source)
    p = spawn(uri, cwd=tmpdir_short)
    assert p.wait_exit(10) == 3
    err = p.stderr
    assert needle in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"modeld: cannot load model '{uri}': ") and needle in last


def test_pickle_model(spawn, tmpdir_short):
    out = os.path.join(tmpdir_short, "iris.pkl")
    subprocess.run([sys.executable, "examples/make_pickle.py", out], cwd=ROOT, check=True, capture_output=True)
    p = spawn(out, model_type="pickle", name="iris").wait_ready()
    status, body, _ = request(p.tcp(), "POST", "/v1/models/iris:predict", {"instances": [SETOSA, VIRGINICA]})
    assert (status, body) == (200, {"predictions": ["setosa", "virginica"]})


def test_joblib_without_joblib_is_a_clear_error(spawn, tmpdir_short):
    try:
        import joblib  # noqa: F401

        pytest.skip("joblib is installed")
    except ImportError:
        pass
    write(tmpdir_short, "m.joblib", "x")
    p = spawn(os.path.join(tmpdir_short, "m.joblib"), model_type="pickle")
    assert p.wait_exit(10) == 3
    assert "joblib" in p.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------
# Process lifecycle: fd handoff, SIGTERM, zero-downtime handover


def test_fd_handoff(spawn):
    p = spawn("examples/iris.py:model", fd_socket=True).wait_ready()
    assert os.stat(p.fd_socket).st_mode & 0o077 == 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(p.fd_socket)
        msg, fds, _flags, _addr = socket.recv_fds(c, 16, 1)
    assert msg == b"fd" and len(fds) == 1
    with socket.socket(fileno=fds[0]) as got:
        assert got.getsockname() == p.sock.getsockname()
        assert got.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_sigterm_exits_zero(spawn):
    p = spawn("examples/iris.py:model", fd_socket=True).wait_ready()
    assert "modeld: serving model 'm'" in p.stderr
    p.proc.send_signal(signal.SIGTERM)
    assert p.wait_exit(5) == 0
    assert not os.path.exists(p.unix) and not os.path.exists(p.fd_socket)


def test_zero_failure_handover(spawn):
    shared = listening_socket()
    try:
        old = spawn("examples/iris.py:model", sock=shared)
        new = spawn("examples/iris.py:model", sock=shared)
        old.wait_ready()
        new.wait_ready()
        port = shared.getsockname()[1]
        stop = threading.Event()
        ok, failures = [0], []

        def fresh_connections():
            while not stop.is_set():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                try:
                    status, body, _ = request(conn, "POST", "/v1/models/m:predict", {"instances": [SETOSA]})
                    if status == 200 and body == {"predictions": ["setosa"]}:
                        ok[0] += 1
                    else:
                        failures.append((status, body))
                except Exception as exc:  # noqa: BLE001 - any failure counts
                    failures.append(repr(exc))

        def keep_alive():
            # Reuses its connection until the server says "Connection: close".
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                while not stop.is_set():
                    try:
                        conn.request("POST", "/v1/models/m:predict", body=json.dumps({"instances": [SETOSA]}))
                        resp = conn.getresponse()
                        body = json.loads(resp.read())
                        if resp.status == 200 and body == {"predictions": ["setosa"]}:
                            ok[0] += 1
                        else:
                            failures.append((resp.status, body))
                    except Exception as exc:  # noqa: BLE001 - any failure counts
                        failures.append("keep-alive: " + repr(exc))
                        conn.close()
            finally:
                conn.close()

        threads = [threading.Thread(target=fresh_connections) for _ in range(4)]
        threads.append(threading.Thread(target=keep_alive))
        for t in threads:
            t.start()
        try:
            before = wait_for(lambda: ok[0] >= 10 and ok[0], 10, what="requests to flow")
            old.proc.send_signal(signal.SIGTERM)
            assert old.wait_exit(5) == 0
            after_exit = ok[0]
            wait_for(lambda: ok[0] >= after_exit + 10, 10, what="the new server to answer after the old one exited")
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert failures == []
        assert before > 0 and ok[0] > after_exit
        assert request(new.tcp(), "GET", "/health")[0] == 200
    finally:
        shared.close()
