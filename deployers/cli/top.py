"""``modeld top``: a live view of the services (state, uptime, restarts, memory, CPU, requests per
second, last event) over a strip of the latest events, redrawn in place with the standard library's
curses; on output that is not a terminal, one snapshot as plain text. The numbers: top_data.py."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from deployers.cli import connect
from deployers.cli.event_commands import event_line, how_it_ended
from deployers.cli.output import print_json
from deployers.cli.values import seconds

if TYPE_CHECKING:
    import curses

    from deployers.cli.top_data import EventFeed, Row, Sampler

HEADERS = ("ID", "NAME", "STATE", "UPTIME", "RESTARTS", "MEM", "CPU", "REQ/S", "LAST EVENT")


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


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
    """The rows as lines of aligned columns, the headers first; two spaces or more between columns."""
    cells = [
        [
            r.uuid[:8],
            r.name,
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
    widths = [max(len(c) for c in col) for col in zip(HEADERS, *cells, strict=False)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in (HEADERS, *cells)]


def headline(sampler: Sampler, now: float) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(now))
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
        self.win.timeout(100)  # getch waits at most 0.1 s: events show within that
        next_at, seen = 0.0, -1
        while True:
            now = time.monotonic()
            dirty = False
            if now >= next_at:
                self.rows = self.sampler.take(self.feed)
                next_at, dirty = now + self.interval, True
            if self.feed.count != seen:
                seen, dirty = self.feed.count, True
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
                self.win.addnstr(y, 0, text, width - 1, attr)
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

    client = connect.client(args)
    client.daemon_info()  # starts the daemon, as every command does; after that, top never starts one
    sampler = Sampler(connect.client(args, auto_start=False, timeout=10))
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
        type=seconds,
        default=1.0,
        help="seconds between refreshes, and over which CPU and REQ/S are taken (default 1)",
    )
    p.add_argument(
        "--events", type=int, default=10, help="when not on a terminal: how many of the latest events to print (default 10)"
    )
