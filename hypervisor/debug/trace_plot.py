"""`pyhv trace plot FILE -o exits.png`: exits per second over the run, one line per kind.

matplotlib is an optional extra (`pip install 'pyhv[plot]'`); without it the command says how to
install it (ConfigError, exit 3). The figure is drawn with the non-interactive Agg backend, so no
display is needed. Exits that are only counted (C fast path, emulated instructions) have no
time: the title gives their total instead of a line.
"""

from __future__ import annotations

from pathlib import Path

from hypervisor.debug.trace_summary import TraceFile, counted_exits, group_key
from hypervisor.errors import ConfigError

DEFAULT_BINS = 100
MAX_SERIES = 8  # the busiest kinds get a line each; the rest are summed as "other"
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def exit_series(
    trace: TraceFile, by: str = "reason", bins: int = DEFAULT_BINS
) -> tuple[list[float], dict[str, list[float]]]:
    """Bin centres (seconds) and, per group, exits per second in each bin."""
    exits = [record for record in trace.records if not record.aggregate]
    if not exits:
        return [], {}
    times = [record.t for record in exits]
    end = max(max(times), 1e-6)
    width = end / bins
    counts: dict[str, list[int]] = {}
    for record, when in zip(exits, times, strict=True):
        slot = min(int(when / width), bins - 1) if when > 0 else 0
        counts.setdefault(group_key(record, by), [0] * bins)[slot] += 1
    busiest = sorted(counts, key=lambda key: -sum(counts[key]))
    series: dict[str, list[float]] = {}
    for key in busiest[:MAX_SERIES]:
        series[key] = [count / width for count in counts[key]]
    if len(busiest) > MAX_SERIES:
        other = [0.0] * bins
        for key in busiest[MAX_SERIES:]:
            other = [total + count / width for total, count in zip(other, counts[key], strict=True)]
        series["other"] = other
    centres = [(index + 0.5) * width for index in range(bins)]
    return centres, series


def check_output(path: Path) -> None:
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ConfigError(f"-o {path}: the picture's name must end in {', '.join(PLOT_SUFFIXES)}")
    if path.is_dir():
        raise ConfigError(f"-o {path} is a directory")
    if not path.parent.is_dir():
        raise ConfigError(f"-o {path}: the folder {path.parent} does not exist")


def plot_trace(trace: TraceFile, output: Path, by: str = "reason", title: str | None = None) -> int:
    """Draws the figure into `output`; returns the number of series drawn."""
    check_output(output)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'pyhv[plot]' (or pip install matplotlib)") from None
    centres, series = exit_series(trace, by)
    if not series:
        raise ConfigError("the trace holds no exits to plot")
    counted = counted_exits(trace)
    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=100)
    try:
        for key, rates in series.items():
            axes.plot(centres, rates, label=key, linewidth=1.4)
        axes.set_xlabel("seconds since the start of the run")
        axes.set_ylabel("exits per second")
        axes.set_yscale("symlog", linthresh=10)
        heading = title or "VM exits that reached Python, by " + by
        if counted:
            heading += f"\n(+{counted} exits only counted: C fast path, pyhv's emulator)"
        axes.set_title(heading, fontsize=10)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8, loc="upper right")
        figure.tight_layout()
        try:
            figure.savefig(output)
        except OSError as error:
            raise ConfigError(f"cannot write {output}: {error.strerror}") from error
    finally:
        plt.close(figure)
    return len(series)
