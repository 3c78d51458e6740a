"""The test harness: what tests/ and scripts/{bench,chaos,fuzz}.py share to start, watch, check and
clean up real daemons and servers in temp homes. Not used by the daemon itself.

One concept a module, and this package re-exports what its users import, so that they see one
harness (``from daemon.testing import wait_for``, ``harness.check(snap)``) whatever module holds it:

- ``wait``: ``wait_for`` (poll with a deadline; never a fixed sleep);
- ``identities``: the pid files, read with the store's own parser; alive by start ticks; ``kill_verified``;
- ``processes``: the processes of a home (tagged, forked or in its cgroups), servers, leaders, helpers;
- ``cgroups``: the home's cgroups, their members, their removal;
- ``reaper``: ``reap`` and ``reap_home``;
- ``daemon_process``: ``DaemonProcess``, the daemon process handle;
- ``invariants``: the home's invariants (``snapshot``/``check``/``wait_settled``, ``log_faults``);
- ``wire``: one Unix-socket HTTP connection (``UnixHTTP``), ``free_port``;
- ``servers``: the tiny HTTP server scripts the tests deploy; ``checkout``: ``REPO``, ``IRIS``.

Invariants:

- A process is signalled only by pid checked against its start ticks (through a pidfd, so the pid
  cannot be reused in between: ``kill_verified``), or by the process group a checked leader leads,
  or through the home's own cgroups: never by name, never by psutil's float create time.
- ``reap_home`` leaves nothing of a home running and removes its cgroups, whatever state the test
  left; it may run any number of times.
- Nothing here imports from scripts/ or tests/; both import this (it is in the installed package).
"""

from __future__ import annotations

from daemon.testing.cgroups import cgroup_members, home_cgroups
from daemon.testing.checkout import IRIS, REPO
from daemon.testing.daemon_process import DaemonProcess
from daemon.testing.identities import kill_verified, pid_alive, read_pid, ticks_alive
from daemon.testing.invariants import (
    CONVERGE_TIMEOUT,
    LOG_SLACK,
    Snapshot,
    answer_tag,
    check,
    config_tag,
    describe,
    log_faults,
    snapshot,
    wait_settled,
)
from daemon.testing.processes import (
    HELPERS,
    Helper,
    ServerProcess,
    daemon_side,
    forked_tags,
    helpers,
    processes_of,
    server_leaders,
    server_processes,
)
from daemon.testing.reaper import reap, reap_home
from daemon.testing.servers import COMMAND_SERVER, FLOOD_SERVER, HELPER_SERVER, TINY_SERVER, TOKEN_SERVER, server_script
from daemon.testing.wait import WaitTimeout, wait_for
from daemon.testing.wire import UnixHTTP, free_port

__all__ = [
    "COMMAND_SERVER",
    "CONVERGE_TIMEOUT",
    "DaemonProcess",
    "FLOOD_SERVER",
    "HELPERS",
    "HELPER_SERVER",
    "Helper",
    "IRIS",
    "LOG_SLACK",
    "REPO",
    "ServerProcess",
    "Snapshot",
    "TINY_SERVER",
    "TOKEN_SERVER",
    "UnixHTTP",
    "WaitTimeout",
    "answer_tag",
    "cgroup_members",
    "check",
    "config_tag",
    "daemon_side",
    "describe",
    "forked_tags",
    "free_port",
    "helpers",
    "home_cgroups",
    "kill_verified",
    "log_faults",
    "pid_alive",
    "processes_of",
    "read_pid",
    "reap",
    "reap_home",
    "server_leaders",
    "server_processes",
    "server_script",
    "snapshot",
    "ticks_alive",
    "wait_for",
    "wait_settled",
]
