"""The `pyhv` command line: the only layer that prints. Subcommands live in sibling modules.

Subcommands are imported only when invoked (a lazy click group), so `pyhv run` does not pay for
loading the image tools and the other way round; startup time is a benchmarked target.
"""

from __future__ import annotations

import importlib
import logging

import click

from hypervisor import __version__

# name -> "module:attribute" of each subcommand
SUBCOMMANDS = {
    "run": "hypervisor.cli.run:run",
    "exec": "hypervisor.cli.exec:exec_command",
    "debug": "hypervisor.cli.debug:debug",
    "image": "hypervisor.cli.image:image",
    "trace": "hypervisor.cli.trace:trace",
    "kvm-unit-tests": "hypervisor.cli.kvm_unit_tests:kvm_unit_tests",
    "kunit": "hypervisor.cli.kunit:kunit",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)  # type: ignore[no-any-return]


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pyhv")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """pyhv: run guests on Linux KVM (and trace their VM exits), manage disk images."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="pyhv: %(levelname)s: %(message)s")
