"""``python -m daemon.client.apply_main FILE``: how the daemon applies its ``apply`` setting, as a
client of itself in a child process (see ``Daemon.apply_at_start``), so the daemon imports no client."""

from __future__ import annotations

import argparse
import sys

from ..exceptions import DaemonNotRunning, ModeldError, RequestError
from .apply import describe
from .calls import DaemonClient


def main(argv: list[str] | None = None) -> int:
    """``python -m daemon.client.apply_main [--home H] [--socket S] FILE``: apply FILE and print the report
    (how the daemon applies its ``apply`` setting). Exit code 0 applied, 1 some service failed, 2 the
    file does not validate (nothing applied), 3 no daemon answers."""
    parser = argparse.ArgumentParser(prog="python -m daemon.client.apply_main", description=main.__doc__)
    parser.add_argument("--home")
    parser.add_argument("--socket")
    parser.add_argument("file")
    args = parser.parse_args(argv)
    try:
        with DaemonClient(home=args.home, socket_path=args.socket, auto_start=False) as client:
            report = client.apply(args.file)
    except (RequestError, DaemonNotRunning) as exc:
        print(exc.message, file=sys.stderr)
        return 2 if isinstance(exc, RequestError) else 3
    except ModeldError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    print("\n".join(describe(report)))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
