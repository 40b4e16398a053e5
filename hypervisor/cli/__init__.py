"""The `pyhv` command line: the only layer that prints. Subcommands live in sibling modules."""

from __future__ import annotations

import logging

import click

from hypervisor import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pyhv")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """pyhv: run guests on Linux KVM, manage disk images, debug VM exits."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="pyhv: %(levelname)s: %(message)s")


def _register() -> None:
    from hypervisor.cli import run

    main.add_command(run.run)
    try:  # TEMPORARY until image lands
        from hypervisor.cli import image
        main.add_command(image.image)
    except ImportError:
        pass


_register()
