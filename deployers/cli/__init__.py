"""The ``modeld`` command.

Habits of docker, supervisorctl and ZenML's CLI: subcommands, ``--help``
with examples, ``--json`` for data, tables for people. Errors are one line
on stderr and an exit code chosen in one place (:data:`errors.EXIT_CODES`),
never a traceback.

One concept a module:

- ``parser``: the parser of every command, and :func:`main` (the ``modeld``
  entry point, and ``python -m deployers.cli``);
- ``options``: ``deploy``'s options, made from ``ServiceConfig``'s fields
  (``DEPLOY_OVERRIDES``), and the config read back from them;
- ``service_commands``: deploy, ls, info, start, stop, rm, logs;
- ``target``: ``--deployer NAME`` / ``$MODELD_DEPLOYER``, which deployer a command goes through;
- ``deployer_commands``: those commands through any registered deployer's BaseModelDeployer
  methods, with the same output; ``redeploy``;
- ``daemon_commands``: ``daemon start|stop|status|run``;
- ``login_commands``: ``daemon install|uninstall`` (a systemd user unit);
- ``registry_commands``: ``flavor`` and ``deployer``;
- ``connect``: the client every command makes, a service named by the user;
- ``top``, ``top_data``: ``modeld top``, its screen (curses) and its numbers
  (``/metrics`` read back, rates, the events followed in a thread);
- ``progress``: a slow call's progress line on a terminal;
- ``errors``, ``output``, ``values``: exit codes and one-line errors, JSON
  and tables, argparse's types for seconds, sizes and counts.
"""

from __future__ import annotations

from deployers.cli.parser import main

__all__ = ["main"]
