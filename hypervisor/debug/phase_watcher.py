"""Timestamps of boot phases ("Linux version", "Run /init") as they appear on the console.

A `PhaseWatcher` is fed every chunk of guest output: the console observer times a Linux boot
with one, and `pyhv run --save-on PATTERN` puts one in `Machine.output_watchers` to save when
its pattern shows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping


class PhaseWatcher:
    """Timestamps the first appearance of each pattern in the output stream.

    Output often arrives a byte at a time, so a pattern is matched across chunk boundaries by
    keeping the tail of the stream that could still start a match.
    """

    def __init__(
        self,
        patterns: Mapping[str, bytes],
        on_match: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._patterns = {name: pattern for name, pattern in patterns.items() if pattern}
        self._on_match = on_match
        self._clock = clock
        self._keep = max((len(p) for p in self._patterns.values()), default=1) - 1
        self._tail = b""
        self._lock = threading.Lock()
        self.seen: dict[str, float] = {}

    def __call__(self, data: bytes) -> None:
        matched: list[tuple[str, float]] = []
        with self._lock:
            if len(self.seen) == len(self._patterns):
                return
            window = self._tail + data
            now = self._clock()
            for name, pattern in self._patterns.items():
                if name not in self.seen and pattern in window:
                    self.seen[name] = now
                    matched.append((name, now))
            self._tail = window[-self._keep :] if self._keep else b""
        if self._on_match is not None:
            for name, when in matched:
                self._on_match(name, when)
