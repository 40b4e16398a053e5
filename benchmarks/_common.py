"""Helpers the benchmark scripts share: statistics and the one-JSON-object last line."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# Installed Python packages have their bytecode cached; an environment that forbids writing it
# (some CI images set PYTHONDONTWRITEBYTECODE) would time the compiler instead of pyhv, in every
# child `python -m hypervisor` a benchmark starts.
CHILD_ENVIRONMENT = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def median(values: list[float]) -> float:
    return statistics.median(values)


def emit(figures: dict[str, object]) -> None:
    """Prints the figures as the benchmark's last line: one JSON object."""
    print(json.dumps(figures, sort_keys=True))


class CountingDevice:
    """A Python port device for the exit benchmarks: counts writes and stops the run after
    `target` of them, timing the first to the last (exit_overhead.py, breakpoints.py)."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine
        self.target = 0
        self.count = 0
        self.first = self.last = 0.0

    def arm(self, target: int) -> None:
        self.target, self.count = target, 0

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: bytes) -> None:
        self.count += 1
        if self.count == 1:
            self.first = time.perf_counter()
        elif self.count == self.target:
            from hypervisor.outcome import Outcome, OutcomeKind

            self.last = time.perf_counter()
            self.machine.request_stop(Outcome(OutcomeKind.INTERRUPTED, "benchmark round done"))
