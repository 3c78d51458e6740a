"""Start at login: the systemd user unit that runs the daemon of one home, and ``systemctl --user``.

``modeld daemon install`` writes :func:`unit_text` to :func:`unit_path`
(``$XDG_CONFIG_HOME/systemd/user/modeld.service``); a client that finds no daemon asks systemd to
start that unit (``client/autostart.py``) when it serves the client's home and socket and a user
manager answers (:func:`user_manager`), and otherwise forks the daemon itself. Both run the same
command, :func:`daemon_command`: this interpreter, by absolute path, with ``python -m daemon``
(the entry that keeps the daemon small) and ``daemon/`` importable from where it was found.

Quoting (systemd.syntax(7), systemd.service(5)): a word is written in double quotes with C escapes
(``\\\\``, ``\\"``, ``\\n``, ``\\xhh``); ``%`` is written ``%%`` (specifiers are expanded in
``ExecStart=`` and ``Environment=``); ``$`` is written ``$$`` in the arguments of ``ExecStart=``
(expanded as a variable there) and as it is in ``Environment=`` (not expanded there). The
executable's path is checked by systemd when the unit is loaded and is never ``$``-expanded, but
its ``argv[0]`` is: an interpreter path with ``$``, a quote, a backslash or a control character
is refused (:class:`UnitError`) rather than written in a way systemd would run differently.

Standard library only, and no asyncio: a client imports it when it auto-starts a daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from .paths import Paths

UNIT_NAME = "modeld.service"
# The folder that holds daemon/ (this file is daemon/login.py), put on the daemon's PYTHONPATH so
# that it runs this code even when it is not installed in site-packages (as auto-start does).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "# Written by `modeld daemon install`; `modeld daemon uninstall` removes it."
# What `systemctl --user is-system-running` prints when a user manager answers (offline/unknown: none does).
MANAGER_STATES = frozenset({"initializing", "starting", "running", "degraded", "maintenance", "stopping"})
SYSTEMCTL_TIMEOUT = 5.0


class UnitError(ValueError):
    """A unit that cannot be written, or a unit file that is not modeld's: ``str()`` says why."""


def daemon_command(paths: Paths, python: str | None = None) -> list[str]:
    """The daemon's command line, for auto-start and for the unit alike."""
    return [os.path.abspath(python or sys.executable), "-m", "daemon", "--home", str(paths.home), "--socket", str(paths.socket)]


def unit_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/systemd/user/modeld.service``, ``~/.config/...`` when it is unset or relative
    (as the XDG base directory spec says to treat a relative one), ``~`` being ``$HOME``."""
    environ = os.environ if environ is None else environ
    config = environ.get("XDG_CONFIG_HOME", "")
    if not os.path.isabs(config):
        home = environ.get("HOME") or os.path.expanduser("~")
        config = os.path.join(home, ".config")
    return Path(config) / "systemd" / "user" / UNIT_NAME


def _c_escape(text: str) -> str:
    out = []
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=,+@")


def quote_arg(word: str) -> str:
    """An argument of ``ExecStart=`` (not the executable): systemd gives the process exactly ``word``."""
    if word and set(word) <= _PLAIN:
        return word
    return '"' + _c_escape(word).replace("%", "%%").replace("$", "$$") + '"'


def quote_env(name: str, value: str) -> str:
    """One ``Environment=`` assignment: the process sees ``name=value`` exactly."""
    return '"' + _c_escape(f"{name}={value}").replace("%", "%%") + '"'


def quote_executable(path: str) -> str:
    """The executable of ``ExecStart=``; UnitError for a path systemd would not run as written."""
    bad = sorted({ch for ch in path if ch in "$\"'\\" or ord(ch) < 0x20 or ord(ch) == 0x7F})
    if bad:
        raise UnitError(
            f"systemd cannot run the interpreter {path!r} as it is spelled (it contains {' '.join(map(repr, bad))}); "
            "install modeld under a path without these characters"
        )
    if not os.path.isabs(path):
        raise UnitError(f"the interpreter {path!r} is not an absolute path")
    return path if set(path) <= _PLAIN else '"' + path.replace("%", "%%") + '"'


def unit_text(paths: Paths, python: str | None = None) -> str:
    """The unit that runs the daemon of ``paths`` (see the README's "Start at login" for each line)."""
    argv = daemon_command(paths, python)
    exec_start = " ".join([quote_executable(argv[0]), *map(quote_arg, argv[1:])])
    env = {"MODELD_HOME": str(paths.home), "MODELD_SOCKET": str(paths.socket), "PYTHONPATH": PACKAGE_ROOT}
    return "\n".join(
        [
            MARK,
            "[Unit]",
            f"Description=modeld model-serving daemon ({_description(str(paths.home))})",
            "",
            "[Service]",
            # READY=1 once every service is rebuilt (daemon_process.py), so `systemctl start` returns
            # when the daemon answers with the truth.
            "Type=notify",
            f"ExecStart={exec_start}",
            *(f"Environment={quote_env(k, v)}" for k, v in env.items()),
            # Model servers outlive the daemon (modeld's design): stopping the unit, or the daemon
            # dying, ends the daemon alone; the next daemon adopts the servers.
            "KillMode=process",
            # The daemon owns the unit's cgroup subtree, for its services' cgroups.
            "Delegate=yes",
            "Restart=on-failure",
            # Exit 3: a bad setting (daemon.toml) or another daemon holds the home; a retry would not help.
            "RestartPreventExitStatus=3",
            "",
            "[Install]",
            "WantedBy=default.target",
            "",
        ]
    )


def _description(text: str) -> str:
    """Text for ``Description=`` (taken as written, specifiers expanded): ``%%``, no control character."""
    return "".join("?" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in text).replace("%", "%%")


def _unquote(word: str) -> str:
    """A value as :func:`quote_env` wrote it, read back (the C escapes and ``%%``; not systemd's whole grammar)."""
    if len(word) < 2 or word[0] != '"' or word[-1] != '"':
        raise UnitError(f"not a double-quoted word: {word!r}")
    body, out, i = word[1:-1], [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt == "x":
                out.append(chr(int(body[i + 2 : i + 4], 16)))
                i += 4
                continue
            out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            i += 2
        elif ch == "%" and body[i + 1 : i + 2] == "%":
            out.append("%")
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def read_unit(path: Path | None = None) -> dict[str, str] | None:
    """The ``Environment=`` of modeld's installed unit (MODELD_HOME, MODELD_SOCKET...), or None when
    there is no unit file. UnitError if the file is there but was not written by modeld."""
    path = path or unit_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnitError(f"cannot read {path}: {exc}") from exc
    if not text.startswith(MARK):
        raise UnitError(f"{path} was not written by `modeld daemon install`; modeld leaves it alone")
    env = {}
    for line in text.splitlines():
        if line.startswith("Environment="):
            name, _, value = _unquote(line.removeprefix("Environment=")).partition("=")
            env[name] = value
    return env


def serves(env: dict[str, str] | None, paths: Paths) -> bool:
    """Whether a unit of these ``Environment=`` values runs the daemon of ``paths`` (same home, same socket)."""
    return env is not None and env.get("MODELD_HOME") == str(paths.home) and env.get("MODELD_SOCKET") == str(paths.socket)


def systemctl(*args: str, timeout: float = SYSTEMCTL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``systemctl --user ARGS``; OSError if systemctl is not there, TimeoutExpired past ``timeout``."""
    exe = shutil.which("systemctl")
    if exe is None:
        raise FileNotFoundError("systemctl is not installed")
    return subprocess.run(
        [exe, "--user", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
    )


def user_manager(timeout: float = SYSTEMCTL_TIMEOUT) -> str | None:
    """The state of this user's systemd manager (``running``, ``degraded``...) if one answers, else None."""
    try:
        result = systemctl("is-system-running", timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    state = result.stdout.strip()
    return state if state in MANAGER_STATES else None


def run_hint(*args: str) -> str:
    """How a user runs ``systemctl --user ARGS`` themselves, as a shell line."""
    import shlex

    return shlex.join(["systemctl", "--user", *args])
