"""``modeld daemon install|uninstall``: the daemon of a home as a systemd user unit, started at login.

The unit and the calls to ``systemctl --user`` are ``daemon/login.py``'s; this module decides what
to run and says what it did and what is left for the user to run. Where no user manager answers
(no login session of systemd's, a container), ``enable`` is still tried: systemctl links the unit
into ``default.target.wants`` by itself when no systemd runs the machine, and fails otherwise, and
then the command prints the line to run in a session that has one.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon import exceptions as exc, login
from daemon.paths import Paths
from deployers.cli.errors import UsageError
from deployers.cli.output import print_json


class _Report:
    """What the command did and what it leaves to the user, in order: printed as lines, or with --json
    as ``ran`` (each systemctl call and its outcome), ``to_run`` (the commands left to the user) and ``notes``."""

    def __init__(self, unit: Path, manager: str | None):
        self.data: dict[str, Any] = {"unit": str(unit), "user_manager": manager, "ran": [], "to_run": [], "notes": []}
        self.lines: list[str] = []

    def run(self, *args: str) -> bool:
        """``systemctl --user ARGS``, recorded; whether it succeeded."""
        command = login.run_hint(*args)
        try:
            result = login.systemctl(*args)
        except (OSError, subprocess.TimeoutExpired) as error:
            ok, said = False, str(error)
        else:
            ok = result.returncode == 0
            said = " ".join((result.stderr or result.stdout).split()) or f"exit code {result.returncode}"
        self.data["ran"].append({"command": command, "ok": ok, "error": "" if ok else said})
        self.lines.append(f"ran: {command}" + ("" if ok else f" (failed: {said})"))
        return ok

    def note(self, line: str, *to_run: str) -> None:
        """A sentence, and the commands it asks the user to run (printed indented under it)."""
        self.data["notes"].append(line)
        self.data["to_run"].extend(to_run)
        self.lines += [line, *(f"  {command}" for command in to_run)]

    def print(self, as_json: bool) -> None:
        if as_json:
            print_json(self.data)
        else:
            print("\n".join(self.lines))


def _installed(path: Path) -> dict[str, str] | None:
    try:
        return login.read_unit(path)
    except login.UnitError as error:
        raise UsageError(str(error)) from None


def _write(path: Path, text: str) -> None:
    """The unit file, replaced whole (readers see the old one or the new one), mode 0644 as units are."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise exc.StorageError(f"cannot write {path}: {error.strerror or error}") from error


def _linger_hint(report: _Report) -> None:
    user = getpass.getuser()
    if os.path.exists(f"/var/lib/systemd/linger/{user}"):
        report.note(f"linger is on for {user}: the daemon starts at boot and keeps running after you log out")
    else:
        report.note(
            "to start it at boot rather than at login, and keep it running after you log out:", f"loginctl enable-linger {user}"
        )


def cmd_daemon_install(args: argparse.Namespace) -> int:
    from daemon.daemon_process import running_daemon

    paths = Paths(args.home)
    path = login.unit_path()
    try:
        text = login.unit_text(paths)
    except login.UnitError as error:
        raise UsageError(str(error)) from None
    if args.dry_run and args.json:
        print_json({"unit": str(path), "text": text, "written": False})
        return 0
    if args.dry_run:
        print(text, end="")
        print(f"modeld: dry run: nothing written; `modeld daemon install` writes this to {path}", file=sys.stderr)
        return 0
    existing = _installed(path)
    if existing is not None and not login.serves(existing, paths):
        other = existing.get("MODELD_HOME", "?")
        raise UsageError(
            f"{path} runs the daemon of another home ({other}, socket {existing.get('MODELD_SOCKET', '?')}); "
            f"remove it first with `modeld daemon uninstall --home {shlex.quote(other)}`"
        )
    changed = existing is not None and path.read_text() != text
    _write(path, text)
    manager = login.user_manager()
    report = _Report(path, manager)
    report.note(f"wrote {path}" + (" (replacing the one that was there)" if existing is not None else ""))
    running = running_daemon(paths)
    if manager is not None:
        report.run("daemon-reload")
        if running is not None and not running[1].startswith("systemd"):
            # Its lock would refuse the unit's daemon: enable for the next login, and say how to switch now.
            report.run("enable", login.UNIT_NAME)
            report.note(
                f"a daemon started by {running[1] or 'an older modeld'} runs for this home (pid {running[0]}); "
                "the unit starts at your next login, or now with:",
                f"modeld daemon stop && {login.run_hint('start', login.UNIT_NAME)}",
            )
        elif report.run("enable", "--now", login.UNIT_NAME):
            if changed:  # the daemon running under the old unit restarts under the new one (its servers keep running)
                report.run("try-restart", login.UNIT_NAME)
            report.note(f"enabled and started {login.UNIT_NAME}: the daemon of {paths.home} runs under systemd")
        else:
            report.note(
                f"see `journalctl --user -u {login.UNIT_NAME}`, then run:", login.run_hint("enable", "--now", login.UNIT_NAME)
            )
    elif report.run("enable", login.UNIT_NAME):  # works on the files alone where no systemd runs the machine
        report.note(
            "no systemd user manager answers here, so the unit is enabled but not started; in a session that has one, run:",
            login.run_hint("start", login.UNIT_NAME),
        )
    else:
        report.note(
            "no systemd user manager answers here; in a session that has one, run:",
            f"{login.run_hint('daemon-reload')} && {login.run_hint('enable', '--now', login.UNIT_NAME)}",
        )
    if manager is None:
        report.note("until then, clients start the daemon themselves, as without the unit")
    _linger_hint(report)
    report.print(args.json)
    return 0


def cmd_daemon_uninstall(args: argparse.Namespace) -> int:
    paths = Paths(args.home)
    path = login.unit_path()
    existing = _installed(path)
    if existing is None:
        print(f"no modeld unit is installed ({path} does not exist)")
        return 0
    if not login.serves(existing, paths):
        other = existing.get("MODELD_HOME", "?")
        raise UsageError(
            f"{path} runs the daemon of another home ({other}); to remove it: `modeld daemon uninstall --home {shlex.quote(other)}`"
        )
    manager = login.user_manager()
    report = _Report(path, manager)
    if manager is not None:
        # Stops the daemon alone (KillMode=process): the model servers keep running, and the next
        # client's auto-start adopts them.
        report.run("disable", "--now", login.UNIT_NAME)
    else:
        report.run("disable", login.UNIT_NAME)  # (on the files alone where no systemd runs the machine)
    wants = path.parent / "default.target.wants" / login.UNIT_NAME
    if wants.is_symlink() and os.path.realpath(wants) == os.path.realpath(path):
        wants.unlink()  # systemctl could not disable it: its link would dangle
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        raise exc.StorageError(f"cannot remove {path}: {error.strerror or error}") from error
    report.note(f"removed {path}")
    if manager is not None:
        report.run("daemon-reload")
        report.note("the model servers keep running; the next modeld command starts a daemon that adopts them")
    else:
        report.note("no systemd user manager answers here; nothing was running under it")
    report.print(args.json)
    return 0
