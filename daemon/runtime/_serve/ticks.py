"""uvicorn's server ticking once a second: the daemon's API server and the built-in servers both run it
(the daemon imports only this module of the server runtime, not the draining server and its app)."""

from __future__ import annotations

import asyncio

import uvicorn


class SecondTicks(uvicorn.Server):
    """uvicorn's server, but ticking once a second instead of ten times, and woken at once on ``exit_now``.

    uvicorn's loop wakes every 0.1 s to see whether it should exit, and dates its responses every
    tenth wake. Here the exit has its own wake-up, so an idle server costs the machine one wake-up
    a second (a thousand servers: a thousand, not ten thousand; in the daemon with 100 servers,
    a sixth of its idle CPU). ``on_tick`` with a count of 0 dates the responses each time.
    """

    _wake: asyncio.Future[None] | None = None

    async def main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not await self.on_tick(0):
            self._wake = wake = loop.create_future()
            timer = loop.call_later(1.0, _settle, wake)
            try:
                await wake
            finally:
                timer.cancel()

    def exit_now(self) -> None:
        """Stop serving (uvicorn's ``should_exit``), now rather than at the next second's wake."""
        self.should_exit = True
        if self._wake is not None:
            _settle(self._wake)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
