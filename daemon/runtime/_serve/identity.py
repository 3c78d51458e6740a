"""How a built-in server process makes itself known: its name in ps, its lines on stderr, its exit codes.

The daemon and the tests find the fork server and the servers by these names
(``comm``, at most 15 bytes), so they are defined here once; ps shows a server
as ``modeld-serve <model> <first 8 of its uuid>``. stderr is the service's log.
Exit codes: 0 after a graceful stop, ``EXIT_USAGE`` for bad arguments or
sockets, ``EXIT_LOAD`` when the model cannot be loaded (see ``serve.py``).
"""

from __future__ import annotations

import sys

FORK_SERVER_NAME = "modeld-fork"  # the fork server's process name (comm), so it is told from the servers it forks
SERVER_NAME = "modeld-serve"  # a built-in server's process name (comm); ps shows "modeld-serve <model> <uuid>"

EXIT_USAGE = 2
EXIT_LOAD = 3


def log(msg: str) -> None:
    print(f"modeld: {msg}", file=sys.stderr, flush=True)


def set_comm(name: str) -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def set_title(title: str) -> None:
    """Name this process in ps: ``comm`` (what ``ps -o comm``, top and pgrep show) and the command line.

    The command line is rewritten in place, in the memory the kernel shows as
    /proc/<pid>/cmdline (arg_start..arg_end of /proc/self/stat), as setproctitle does
    when the title fits; it is cut to the room the original arguments left. Where that
    cannot be done (no ctypes, an unexpected layout), only ``comm`` changes.
    """
    set_comm(title.split(" ", 1)[0])
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
