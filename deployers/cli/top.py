"""``modeld top``: a live view of the services (state, uptime, restarts, memory, CPU, requests per
second, last event) over a strip of the latest events, redrawn in place with the standard library's
curses; on output that is not a terminal, one snapshot as plain text. The numbers: top_data.py."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from daemon import exceptions as exc
from deployers.cli import connect
from deployers.cli.event_commands import event_line, how_it_ended
from deployers.cli.output import cells, duration, print_json, printable
from deployers.cli.progress import fit
from deployers.cli.values import count, seconds

if TYPE_CHECKING:
    import curses

    from deployers.cli.top_data import EventFeed, Row, Sampler

HEADERS = ("ID", "NAME", "STATE", "UPTIME", "RESTARTS", "MEM", "CPU", "REQ/S", "LAST EVENT")
NAME_MAX = 24  # cells of the NAME column: a longer name is cut, ending in "…"
START_WAIT = 5.0  # seconds the first call (which may start the daemon) waits for an answer before the screen shows
CPU_WAIT = 7.0  # seconds a snapshot scrapes again for a CPU rate of every running server (readings last 5 s)
MAX_INTERVAL = 3600.0  # seconds: the longest --interval
SILENT = 1.0  # seconds without the daemon's answer before the first line says so


def cut(text: str, most: int) -> str:
    """``text`` on one line in at most ``most`` cells, ending in "…" when it was cut."""
    text = printable(text)
    return text if cells(text) <= most else fit(text, most - 1) + "…"


def pad(text: str, width: int) -> str:
    return text + " " * (width - cells(text))


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{int(n)}B"


def number(x: float | None, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.1f}{suffix}"


def what_happened(event: dict[str, Any] | None, now: float) -> str:
    """A service's last event in a few words: its type, exit code or signal, and how long ago."""
    if event is None:
        return "-"
    status = f" ({how_it_ended(event)})" if how_it_ended(event) else ""
    age = f" {duration(max(0.0, now - event['time']))} ago" if event.get("time") else ""
    return f"{event.get('type')}{status}{age}"


def table(rows: list[Row], last: dict[str, dict[str, Any]], now: float) -> list[str]:
    """The rows as lines of aligned columns, the headers first; two spaces or more between columns.
    Widths are in terminal cells (a CJK or emoji name takes two a character), so columns stay aligned."""
    lines = [
        [
            r.uuid[:8],
            cut(r.name, NAME_MAX),
            r.state,
            duration(r.uptime),
            str(r.restarts),
            size(r.memory),
            number(r.cpu, "%"),
            number(r.rps),
            what_happened(last.get(r.uuid, r.last_event), now),
        ]
        for r in rows
    ]
    widths = [max(map(cells, col)) for col in zip(HEADERS, *lines, strict=False)]
    return ["  ".join(pad(c, w) for c, w in zip(line, widths, strict=False)).rstrip() for line in (HEADERS, *lines)]


def headline(sampler: Sampler, now: float) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(now))
    silent = sampler.silent()
    if silent >= SILENT:
        shown = (
            f": the rows are from {time.strftime('%H:%M:%S', time.localtime(sampler.rows_at))}"
            if sampler.rows_at and sampler.rows
            else ""
        )
        return f"modeld top  {when}  the daemon does not answer (for {int(silent)}s; stopped or hung?){shown}"
    if sampler.error:
        return f"modeld top  {when}  {sampler.error}"
    states = Counter(str(s.status.state) for s in sampler.services)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    scrape = sampler.last
    daemon = f"daemon {size(scrape.daemon_rss if scrape else None)}, {number(sampler.daemon_cpu, '%')} cpu"
    return f"modeld top  {when}  {len(sampler.services)} service{'' if len(sampler.services) == 1 else 's'}{': ' + counts if counts else ''}  {daemon}"


def snapshot(args: argparse.Namespace) -> int:
    """One view as text: scrape, wait ``--interval`` (for the rates of CPU and requests), scrape again."""
    from deployers.cli.top_data import EventFeed, Sampler  # here, not at import: other commands need none of it

    client = connect.client(args, timeout=30)
    feed = EventFeed(client)
    sampler = Sampler(client)
    if args.interval > 0:
        sampler.take(feed)
        if not sampler.error:
            time.sleep(args.interval)
    rows = sampler.take(feed)
    # A CPU % is a rate between two of the daemon's readings, which serve it up to 5 s: scrape again
    # (every interval, at most a second apart) until each running server has one, for up to 7 s.
    until = time.monotonic() + CPU_WAIT
    while args.interval > 0 and not sampler.error and not sampler.cpu_known(rows) and time.monotonic() < until:
        time.sleep(min(args.interval, 1.0))
        rows = sampler.take(feed)
    if sampler.error:
        print(f"modeld: {sampler.error}", file=sys.stderr)
        return 3
    feed.read_held()
    now = time.time()
    last = feed.last_by_service()
    if args.json:
        print_json({"services": [r.as_json() | {"last_event": last.get(r.uuid)} for r in rows], "events": feed.tail(args.events)})
        return 0
    print(headline(sampler, now))
    print("\n".join(table(rows, last, now)))
    print("\nlatest events:")
    for event in feed.tail(args.events):
        print(event_line(event))
    return 0


class Screen:
    """The live view on a curses window: :meth:`run` redraws it after each refresh and each event."""

    def __init__(self, window: curses.window, sampler: Sampler, feed: EventFeed, interval: float):
        import curses

        self.curses = curses
        self.win, self.sampler, self.feed, self.interval = window, sampler, feed, interval
        self.rows: list[Row] = []
        self.colors: dict[str, int] = {}
        if curses.has_colors():
            try:
                curses.use_default_colors()
                for i, (state, color) in enumerate(
                    (("active", curses.COLOR_GREEN), ("error", curses.COLOR_RED), ("pending", curses.COLOR_YELLOW)), 1
                ):
                    curses.init_pair(i, color, -1)
                    self.colors[state] = curses.color_pair(i)
            except curses.error:
                self.colors = {}

    def run(self) -> None:
        curses = self.curses
        try:
            curses.curs_set(0)
        except curses.error:
            pass  # a terminal that cannot hide its cursor
        self.win.timeout(100)  # getch waits at most 0.1 s: events and keys are seen within that
        self.sampler.follow(self.feed, self.interval)  # the daemon is asked in a thread: never here
        taken, seen, silent = -1, -1, 0
        while True:
            dirty = False
            if self.sampler.count != taken:
                taken, self.rows, dirty = self.sampler.count, self.sampler.rows, True
            if self.feed.count != seen:
                seen, dirty = self.feed.count, True
            if int(self.sampler.silent()) != silent:  # the first line counts the seconds of silence
                silent, dirty = int(self.sampler.silent()), True
            if dirty:
                self.draw()
            key = self.win.getch()
            if key in (ord("q"), ord("Q")):
                return
            if key == curses.KEY_RESIZE:
                self.draw()

    def put(self, y: int, text: str, attr: int = 0) -> None:
        height, width = self.win.getmaxyx()
        if 0 <= y < height:
            try:
                self.win.addstr(y, 0, fit(printable(text), width - 1), attr)  # cut in cells: a wide character takes two
            except self.curses.error:
                pass  # the bottom right corner: curses writes it, then fails to move the cursor on

    def draw(self) -> None:
        curses = self.curses
        height, _ = self.win.getmaxyx()
        now = time.time()
        self.win.erase()
        self.put(0, headline(self.sampler, now) + "   (q quits)", curses.A_BOLD)
        lines = table(self.rows, self.feed.last_by_service(), now)
        self.put(1, lines[0], curses.A_REVERSE)
        room = max(1, height - 7)  # header, column titles, a blank line, the strip's title, 3 events
        shown = lines[1:] if len(lines) - 1 <= room else lines[1:room]
        state_at = lines[0].index("STATE")
        for i, (line, row) in enumerate(zip(shown, self.rows, strict=False)):
            self.put(2 + i, line)
            color = next((c for s, c in self.colors.items() if row.state.startswith(s)), 0)
            if color:
                try:
                    self.win.chgat(2 + i, state_at, len(row.state), color)
                except curses.error:
                    pass
        y = 2 + len(shown)
        if len(shown) < len(self.rows):
            self.put(y, f"... and {len(self.rows) - len(shown)} more services (a taller terminal shows them)")
            y += 1
        if not self.rows and not self.sampler.error:
            self.put(y, "no services (deploy one: modeld deploy ...)")
            y += 1
        self.put(y + 1, "latest events" + (f"  ({self.feed.error})" if self.feed.error else ""), curses.A_BOLD)
        today = time.strftime("%Y-%m-%d ", time.localtime(now))
        for i, event in enumerate(self.feed.tail(height - y - 2)):
            line = event_line(event)
            self.put(y + 2 + i, line.removeprefix(today))  # today's events: the time of day is enough
        self.win.refresh()


def cmd_top(args: argparse.Namespace) -> int:
    if not sys.stdout.isatty() or args.json:
        return snapshot(args)
    import curses

    from deployers.cli.top_data import EventFeed, Sampler

    # Starts the daemon, as every command does (after that, top never starts one); one that does not
    # answer within START_WAIT is left to the screen, which says so (and q quits it).
    try:
        connect.client(args, timeout=START_WAIT).daemon_info()
    except exc.ProtocolError:
        pass
    except KeyboardInterrupt:
        return 0
    sampler = Sampler(connect.client(args, auto_start=False, timeout=5))
    feed = EventFeed(connect.client(args, auto_start=False))
    feed.follow()
    try:
        curses.wrapper(lambda window: Screen(window, sampler, feed, max(0.2, args.interval)).run())
    except KeyboardInterrupt:
        pass  # Ctrl-C quits as q does; curses.wrapper restored the terminal first
    except curses.error as error:  # e.g. a $TERM that terminfo does not know: one snapshot instead
        print(f"modeld: warning: no live view on this terminal ({error}); one snapshot instead", file=sys.stderr)
        return snapshot(args)
    return 0


def add_top_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-n",
        "--interval",
        type=refresh,
        default=1.0,
        help=f"seconds between refreshes, and over which REQ/S is taken (default 1, at most {MAX_INTERVAL:g})",
    )
    p.add_argument(
        "--events", type=count, default=10, help="when not on a terminal: how many of the latest events to print (default 10)"
    )


def refresh(text: str) -> float:
    """An ``--interval``: seconds, up to MAX_INTERVAL (a longer one would only look hung)."""
    value = seconds(text)
    if value > MAX_INTERVAL:
        raise argparse.ArgumentTypeError(f"{text!r}: give at most {MAX_INTERVAL:g} seconds")
    return value
