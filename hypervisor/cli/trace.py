"""`pyhv trace`: read exit traces written by `pyhv run --trace FILE` (docs/debugging.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hypervisor.errors import HypervisorError


@click.group()
def trace() -> None:
    """Summarize or plot an exit trace (pyhv run --trace FILE)."""


@trace.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--by",
    "groupings",
    multiple=True,
    type=click.Choice(["reason", "device", "register"]),
    help="Group by exit reason, device or device register (repeatable). Default: all three.",
)
def summarize(path: Path, groupings: tuple[str, ...]) -> None:
    """Counts, shares and host time per exit, like `perf kvm stat report`."""
    from hypervisor.debug.trace_summary import (
        GROUPINGS,
        bad_lines_notice,
        describe_trace,
        format_summary,
        read_trace,
        summarize,
    )

    try:
        parsed = read_trace(path)
        tables = [format_summary(summarize(parsed, by)) for by in groupings or GROUPINGS]
    except HypervisorError as error:
        click.echo(f"pyhv: error: {error}", err=True)
        sys.exit(error.exit_status)
    click.echo(f"{path}: {describe_trace(parsed)}")
    for table in tables:
        click.echo()
        click.echo(table)
    notice = bad_lines_notice(parsed)
    if notice:
        click.echo(f"pyhv: warning: {path}: {notice}", err=True)


@trace.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The picture: .png, .svg or .pdf.")
@click.option(
    "--by",
    type=click.Choice(["reason", "device", "register"]),
    default="reason",
    show_default=True,
    help="One line per exit reason, device or device register.",
)
@click.option("--title", help="The figure's title.")
def plot(path: Path, output: Path, by: str, title: str | None) -> None:
    """Exits per second over the run (needs matplotlib: pip install 'pyhv[plot]')."""
    from hypervisor.debug.trace_plot import check_output, plot_trace
    from hypervisor.debug.trace_summary import bad_lines_notice, read_trace

    try:
        check_output(output)
        parsed = read_trace(path)
        series = plot_trace(parsed, output, by, title)
    except HypervisorError as error:
        click.echo(f"pyhv: error: {error}", err=True)
        sys.exit(error.exit_status)
    notice = bad_lines_notice(parsed)
    if notice:
        click.echo(f"pyhv: warning: {path}: {notice}", err=True)
    click.echo(f"{output}: {series} series")
