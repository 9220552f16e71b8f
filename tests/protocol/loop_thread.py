"""An asyncio loop on its own thread, for a server under test: start it there, inspect it
safely from the test thread, stop it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


class LoopThread:
    """Runs ``start(loop)`` on ``loop`` (or a new one) in a daemon thread, then the loop
    forever.

    :raise BaseException: whatever ``start`` raised (re-raised in the test thread).
    """

    def __init__(
        self,
        start: Callable[[asyncio.AbstractEventLoop], None],
        name: str,
        timeout: float = 5.0,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop or asyncio.new_event_loop()
        self.timeout = timeout
        started: Future[None] = Future()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                start(self.loop)
            except BaseException as err:
                started.set_exception(err)
                return
            started.set_result(None)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()
        started.result(timeout=timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop and return its result (safe inspection)."""
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as err:
                fut.set_exception(err)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout=self.timeout)

    def stop(self) -> None:
        """Stop the loop, join the thread, close the loop."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=self.timeout)
        self.loop.close()
