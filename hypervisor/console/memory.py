"""Consoles that stay in the process: `NullConsole` discards, `MemoryConsole` captures."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from hypervisor.console.protocol import ConsoleBase, Feed


class NullConsole(ConsoleBase):
    """Discards output (Machine.output_watchers still see it) and never produces input."""

    def _emit(self, data: bytes) -> None:
        pass


class MemoryConsole(ConsoleBase):
    """Captures output in memory for the API and tests; tests inject input with `feed`."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = bytearray()
        self._changed = threading.Condition()
        self._feed: Feed | None = None
        self._on_quit: Callable[[], None] | None = None
        self._early_input = bytearray()

    def _emit(self, data: bytes) -> None:
        with self._changed:
            self._buffer.extend(data)
            self._changed.notify_all()

    def data(self) -> bytes:
        with self._changed:
            return bytes(self._buffer)

    def text(self) -> str:
        return self.data().decode("utf-8", errors="replace")

    def wait_for(self, pattern: bytes, timeout: float) -> bool:
        """Block until `pattern` appears in the output or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while pattern not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def start(self, feed: Feed, on_quit: Callable[[], None]) -> None:
        with self._changed:
            self._feed, self._on_quit = feed, on_quit
            early, self._early_input = bytes(self._early_input), bytearray()
        if early:
            feed(early)

    def feed(self, data: bytes) -> None:
        """Input for the guest; held until `start` when the machine is not running yet."""
        with self._changed:
            target = self._feed
            if target is None:
                self._early_input.extend(data)
                return
        target(data)

    def quit(self) -> None:
        """What Ctrl-A x does on a terminal: ask the machine to stop."""
        if self._on_quit is not None:
            self._on_quit()

    def close(self) -> None:
        with self._changed:
            self._feed = None
