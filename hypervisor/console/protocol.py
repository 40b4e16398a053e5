"""What every console backend is: the `Console` protocol and `ConsoleBase`, its shared bookkeeping.

A backend

* receives the guest's transmitted bytes in `write(data)` as they come, with no line buffering
  (a shell prompt without a newline must appear at once);
* begins delivering host input through `feed` (the UART's `feed`) in `start(feed, on_quit)`, and
  calls `on_quit` when the user asks to leave (Ctrl-A x on a terminal, as in QEMU's
  `-nographic`);
* stops input and restores whatever `start` changed (the terminal mode above all) in `close()`.

Code that wants to see the output stream whatever the backend appends to
`Machine.output_watchers` instead: the console is only where the output goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

Feed = Callable[[bytes], object]


@runtime_checkable
class Console(Protocol):
    def write(self, data: bytes) -> None: ...

    def start(self, feed: Feed, on_quit: Callable[[], None]) -> None: ...

    def close(self) -> None: ...


class ConsoleBase:
    """Output bookkeeping shared by every backend: when the first byte came, and how many."""

    def __init__(self) -> None:
        self.first_output_time: float | None = None  # time.monotonic() of the first guest byte
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.first_output_time is None:
            self.first_output_time = time.monotonic()
        self.bytes_written += len(data)
        self._emit(data)

    def _emit(self, data: bytes) -> None:
        """Where a backend's output goes: called for every non-empty write."""
        raise NotImplementedError

    def start(self, feed: Feed, on_quit: Callable[[], None]) -> None:
        """Backends without input have nothing to start."""

    def close(self) -> None:
        """Backends without resources have nothing to release."""

    def __enter__(self) -> ConsoleBase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
