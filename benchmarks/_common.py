"""Helpers the benchmark scripts share: statistics and the one-JSON-object last line."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def median(values: list[float]) -> float:
    return statistics.median(values)


def emit(figures: dict[str, object]) -> None:
    """Prints the figures as the benchmark's last line: one JSON object."""
    print(json.dumps(figures, sort_keys=True))
