"""The tiny HTTP servers the tests and scripts deploy as command servers, as Python source."""

from __future__ import annotations

# Every command server the tests and scripts deploy: http.server answering 200 with BODY on every
# GET. argv[1] is the port; each script's own setup says what else it reads.
_HANDLER = """
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
class Server(http.server.HTTPServer):
    address_family = socket.AF_INET6 if ":" in HOST else socket.AF_INET
server = Server((HOST, PORT), Handler)
"""
_SERVE = "server.serve_forever()\n"
# The leader forks the worker that serves (so a kill -9 of the leader alone leaves a worker
# holding the port, as gunicorn or mlflow would) and exits as it does.
_FORKED = """worker = os.fork()
if worker == 0:
    server.serve_forever()
else:
    _, status = os.waitpid(worker, 0)
    sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def server_script(setup: str, forked: bool = False) -> str:
    """A tiny server's source: imports, ``setup`` (which sets PORT and BODY, and HOST if not
    127.0.0.1), the handler, then serve (from a forked worker if ``forked``)."""
    return _server(setup, _FORKED if forked else _SERVE)


def _server(setup: str, main: str = _SERVE) -> str:
    return "import http.server, json, os, socket, subprocess, sys\nHOST = '127.0.0.1'\n" + setup + _HANDLER + main


# argv: {port} {tag}; answers its tag, from a forked worker.
TINY_SERVER = _server("PORT, BODY = int(sys.argv[1]), sys.argv[2].encode()\n", _FORKED)
# TINY_SERVER whose leader first starts a helper in a session of its own (with --envless, with an
# empty environment); argv: {port} {record file} [--envless] {tag}. The helper records itself
# (pid, start ticks, service, launch, kind) in the record file, then becomes a long sleep: no
# record is missing for a helper that runs, whenever its server dies.
HELPER_SERVER = _server(
    """PORT, record, BODY = int(sys.argv[1]), os.path.abspath(sys.argv[2]), sys.argv[-1].encode()
envless = "--envless" in sys.argv
launch = json.loads(os.environ.get("MODELD_PROCESS") or "{}").get("launch") or "-"
script = ('read -r f1 f2 f3 f4 f5 f6 f7 f8 f9 f10 f11 f12 f13 f14 f15 f16 f17 f18 f19 f20 f21 ticks rest < /proc/$$/stat; '
          'echo "$$ $ticks $1 $2 $3" >> "$4"; exec /bin/sleep 100000')
subprocess.Popen(["/bin/sh", "-c", script, "helper", os.environ.get("MODELD_SERVICE_UUID") or "-", launch,
                  "envless" if envless else "tagged", record],
                 start_new_session=True, env={} if envless else None, stdin=subprocess.DEVNULL)
""",
    _FORKED,
)
# argv: {port} ... {tag}; a child (forked before the port is bound, so it never serves) writes the
# log as fast as it can: 60 KiB blocks of short lines and, now and then, a line longer than the
# log writer's 64 KiB chunk. Niced, so that it takes the CPU that is idle.
FLOOD_SERVER = _server("""PORT, BODY = int(sys.argv[1]), sys.argv[-1].encode()
if os.fork() == 0:
    os.nice(10)
    block = b"".join(b"flood %06d %s\\n" % (i, b"." * 72) for i in range(720))
    long_line = b"L" * (100 * 1024) + b"\\n"
    n = 0
    try:
        while True:
            os.write(1, block)
            n += 1
            if n % 64 == 0:
                os.write(1, long_line)
    except OSError:
        os._exit(1)
""")
# argv: {port} {host} [anything]; an empty 200. It prints the size of FZ_BIG and of its last
# argument, so a test can see what exec gave it.
COMMAND_SERVER = _server("""PORT, HOST, BODY = int(sys.argv[1]), sys.argv[2], b""
print("env", len(os.environ.get("FZ_BIG", "")), "arg", len(sys.argv[-1]), flush=True)
""")
# argv: {port} ok|fail; prints API_TOKEN (to see it masked in logs), exits 3 at once with "fail".
TOKEN_SERVER = _server("""PORT, BODY = int(sys.argv[1]), b""
print("starting with token", os.environ.get("API_TOKEN", "-"), flush=True)
if sys.argv[2] == "fail":
    sys.exit(3)
""")
