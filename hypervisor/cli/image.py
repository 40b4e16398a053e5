"""`pyhv image ...`: qemu-img's commands, options, output formats and exit statuses.

Every command validates its input before touching a file, and turns every error into one line on
stderr (`pyhv image: error: ...`) and an exit status: 2 for a usage error click rejects, else the
error's `exit_status` (errors.py: 3 for bad input such as an unusable image or option value, 1 for
a host failure); except `check` (qemu-img: 1 = the check could not be completed) and `compare`
(qemu-img: 2 = error), which keep qemu-img's statuses for every error.
The work itself lives in the hypervisor/block/tools/ library: images.py (info, map, compare,
snapshot, resize), copying.py (convert, rebase, commit) and create_options.py; this module only
parses, calls and prints, with the output formats in image_output.py.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import click

from hypervisor.block.qcow2.check import CheckResult, check_image
from hypervisor.block.qcow2.create import create_qcow2, create_raw, validate
from hypervisor.block.tools import copying, images
from hypervisor.block.tools.create_options import RAW_CREATE_KEYS, check_keys, qcow2_create_options
from hypervisor.cli import image_output
from hypervisor.cli.image_options import parse_option_list, parse_relative_size, parse_snapshot_param
from hypervisor.errors import ConfigError, HypervisorError
from hypervisor.units import parse_size

log = logging.getLogger(__name__)

PROG = "pyhv image"
# As for `pyhv run` (docs/exit-status.md): an option or value click itself rejects.
USAGE_ERROR = 2
# qemu-img's statuses where they differ from HypervisorError.exit_status.
CHECK_INCOMPLETE = 1
CHECK_UNSUPPORTED_FORMAT = 63  # qemu-img: "This image format does not support checks"
COMPARE_DIFFERENT = 1
COMPARE_ERROR = 2
ERROR_STATUS_BY_COMMAND = {"check": CHECK_INCOMPLETE, "compare": COMPARE_ERROR}
OUTPUT_CHOICE = click.Choice(["human", "json"])
FORMAT_CHOICE = click.Choice(["qcow2", "raw"])


def fail(message: str, status: int) -> NoReturn:
    click.echo(f"{PROG}: error: {message}", err=True)
    raise click.exceptions.Exit(status)


class ImageCommand(click.Command):
    """A command whose usage errors and HypervisorErrors end in one line and a known status."""

    def _status(self, default: int) -> int:
        return ERROR_STATUS_BY_COMMAND.get(self.name or "", default)

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            fail(error.format_message(), self._status(USAGE_ERROR))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HypervisorError as error:
            fail(str(error), self._status(error.exit_status))
        except OSError as error:
            name = f"{error.filename}: " if error.filename else ""
            fail(f"{name}{error.strerror or error}", self._status(1))
        except (ValueError, OverflowError) as error:
            fail(str(error), self._status(ConfigError.exit_status))


class ImageGroup(click.Group):
    """Unknown subcommands also end in one line."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as error:
            fail(error.format_message(), USAGE_ERROR)


@click.group(cls=ImageGroup, context_settings={"help_option_names": ["-h", "--help"]})
def image() -> None:
    """Create, inspect, check and convert disk images (qemu-img compatible)."""


def command(**kwargs: Any) -> Any:
    return image.command(cls=ImageCommand, **kwargs)


def _formatting_line(path: str, image_format: str, fields: dict[str, Any]) -> str:
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    return f"Formatting '{path}', fmt={image_format} {text}"


@command(name="create")
@click.option("-f", "image_format", type=FORMAT_CHOICE, default="raw", show_default=True)
@click.option(
    "-o",
    "options",
    multiple=True,
    help="cluster_size=,compat=0.10|1.1,lazy_refcounts=on,"
    "extended_l2=on,refcount_bits=N,preallocation=off|metadata,compression_type=zlib|zstd",
)
@click.option("-b", "backing", help="Backing file (relative names are relative to FILE's folder).")
@click.option("-F", "backing_format", type=FORMAT_CHOICE, help="Format of the backing file.")
@click.option("-u", "unsafe", is_flag=True, help="Do not open the backing file.")
@click.option("-q", "quiet", is_flag=True, help="Print nothing on success.")
@click.argument("filename")
@click.argument("size", required=False)
def create_command(
    image_format: str,
    options: tuple[str, ...],
    backing: str | None,
    backing_format: str | None,
    unsafe: bool,
    quiet: bool,
    filename: str,
    size: str | None,
) -> None:
    """Create FILENAME of SIZE bytes (suffixes k, M, G, T), or the backing file's size."""
    opts = parse_option_list(options)
    size_bytes = parse_size(size) if size is not None else None
    if image_format == "raw":
        check_keys(opts, RAW_CREATE_KEYS, "raw")
        if backing:
            raise ConfigError("raw images cannot have a backing file")
        if "size" in opts:
            size_bytes = parse_size(opts["size"])
        if opts.get("preallocation", "off") != "off":
            raise ConfigError("raw preallocation modes other than off are not supported")
        if size_bytes is None:
            raise ConfigError("Image creation needs a size parameter")
        create_raw(filename, size_bytes)
        if not quiet:
            click.echo(_formatting_line(filename, "raw", {"size": size_bytes}))
        return
    backing = opts.get("backing_file", backing)
    backing_format = opts.get("backing_fmt", backing_format)
    if backing and not unsafe and "size" not in opts:
        backing_path = images.full_backing_filename(filename, backing)
        if backing_format is None:
            raise ConfigError("Backing file specified without backing format (use -F qcow2|raw)")
        with images.opened(backing_path, backing_format) as backing_image:
            size_bytes = backing_image.size if size_bytes is None else size_bytes
    create_options = qcow2_create_options(opts, size_bytes, backing, backing_format)
    validate(create_options)
    create_qcow2(filename, create_options)
    if not quiet:
        fields: dict[str, Any] = {
            "cluster_size": create_options.cluster_size,
            "extended_l2": "on" if create_options.extended_l2 else "off",
        }
        if "preallocation" in opts:
            fields["preallocation"] = create_options.preallocation
        fields.update(compression_type=create_options.compression_type, size=create_options.size)
        if backing:
            fields.update(backing_file=backing, backing_fmt=backing_format)
        if "compat" in opts:
            fields["compat"] = create_options.compat
        fields.update(
            lazy_refcounts="on" if create_options.lazy_refcounts else "off", refcount_bits=create_options.refcount_bits
        )
        click.echo(_formatting_line(filename, "qcow2", fields))


@command(name="info")
@click.option("-f", "image_format", type=FORMAT_CHOICE)
@click.option("--output", "output", type=OUTPUT_CHOICE, default="human")
@click.option("--backing-chain", is_flag=True, help="Also describe every backing file.")
@click.argument("filename")
def info_command(image_format: str | None, output: str, backing_chain: bool, filename: str) -> None:
    """Describe an image: size, format, backing file, snapshots, qcow2 features."""
    if backing_chain:
        chain = images.backing_chain_info(filename, image_format)
        if output == "json":
            click.echo(image_output.to_json(chain))
        else:
            click.echo("\n\n".join(image_output.human_info(info) for info in chain))
        return
    info = images.image_info(filename, image_format)
    click.echo(image_output.to_json(info) if output == "json" else image_output.human_info(info))


@command(name="check")
@click.option("-f", "image_format", type=FORMAT_CHOICE)
@click.option("--output", "output", type=OUTPUT_CHOICE, default="human")
@click.option("-r", "repair", type=click.Choice(["leaks", "all"]), help="Repair leaks only, or leaks and corruptions.")
@click.argument("filename")
def check_command(image_format: str | None, output: str, repair: str | None, filename: str) -> None:
    """Check a qcow2 image's metadata. Exit 0 clean, 1 check failed, 2 corrupt, 3 leaks only."""
    if images.resolve_format(filename, image_format) != "qcow2":
        fail("This image format does not support checks", CHECK_UNSUPPORTED_FORMAT)
    result: CheckResult = check_image(filename, repair)
    for line in result.messages:
        click.echo(line, err=True)
    if output == "json":
        click.echo(image_output.to_json(result.to_json()))
    else:
        click.echo(image_output.human_check(result))
    raise click.exceptions.Exit(result.exit_status)


def _progress_printer(enabled: bool) -> copying.Progress:
    """qemu-img's -p: '    (42.00/100%)' rewritten in place on stdout."""
    last = [-1.0]

    def show(done: int, total: int) -> None:
        percent = 100.0 if not total else done * 100.0 / total
        if percent - last[0] >= 1.0 or (percent == 100.0 and last[0] != 100.0):
            last[0] = percent
            click.echo(f"    ({percent:.2f}/100%)\r", nl=False)

    def quiet(done: int, total: int) -> None:
        return None

    return show if enabled else quiet


@command(name="convert")
@click.option("-f", "source_format", type=FORMAT_CHOICE)
@click.option("-O", "target_format", type=FORMAT_CHOICE, default="raw", show_default=True)
@click.option("-c", "compress", is_flag=True, help="Write compressed clusters (qcow2 only).")
@click.option("-o", "options", multiple=True, help="Create options of the output, as for create.")
@click.option("-p", "progress", is_flag=True, help="Show a progress bar.")
@click.option("-l", "snapshot_param", help="snapshot.name=NAME or snapshot.id=ID: copy that snapshot.")
@click.option(
    "-t",
    "cache",
    default=copying.DEFAULT_CONVERT_CACHE,
    show_default=True,
    help="Target cache mode: writeback syncs the new image before it takes the name; unsafe "
    "(qemu-img's default) does not.",
)
@click.argument("source")
@click.argument("target")
def convert_command(
    source_format: str | None,
    target_format: str,
    compress: bool,
    options: tuple[str, ...],
    progress: bool,
    snapshot_param: str | None,
    cache: str,
    source: str,
    target: str,
) -> None:
    """Copy SOURCE into a new image TARGET (only data is copied; outputs stay sparse)."""
    snapshot = None
    if snapshot_param is not None:
        snapshot_id, snapshot_name = parse_snapshot_param(snapshot_param)
        snapshot = snapshot_id if snapshot_id is not None else snapshot_name
    copying.convert(
        source,
        target,
        source_format,
        target_format,
        compress,
        parse_option_list(options),
        snapshot,
        _progress_printer(progress),
        cache,
    )
    if progress:
        click.echo("")


@command(name="map")
@click.option("-f", "image_format", type=FORMAT_CHOICE)
@click.option("--output", "output", type=OUTPUT_CHOICE, default="human")
@click.argument("filename")
def map_command(image_format: str | None, output: str, filename: str) -> None:
    """Show which ranges of the disk are allocated, zero, or stored where."""
    entries = images.map_entries(filename, image_format)
    if output == "json":
        click.echo(image_output.map_json(entries))
        return
    text, complete = image_output.map_human(entries)
    click.echo(text)
    if not complete:
        fail("File contains external, encrypted or compressed clusters (use --output=json)", 1)


@command(name="compare")
@click.option("-f", "format_a", type=FORMAT_CHOICE)
@click.option("-F", "format_b", type=FORMAT_CHOICE)
@click.option("-s", "strict", is_flag=True, help="Images of different sizes differ.")
@click.argument("first")
@click.argument("second")
def compare_command(format_a: str | None, format_b: str | None, strict: bool, first: str, second: str) -> None:
    """Compare guest-visible contents. Exit 0 identical, 1 different, 2 error."""
    identical, message = images.compare_images(first, second, format_a, format_b, strict)
    click.echo(message)
    raise click.exceptions.Exit(0 if identical else COMPARE_DIFFERENT)


@command(name="snapshot")
@click.option("-l", "list_", is_flag=True, help="List snapshots.")
@click.option("-c", "create", metavar="NAME", help="Create a snapshot.")
@click.option("-d", "delete", metavar="NAME", help="Delete a snapshot (name or id).")
@click.option("-a", "apply", metavar="NAME", help="Revert the disk to a snapshot.")
@click.argument("filename")
def snapshot_command(list_: bool, create: str | None, delete: str | None, apply: str | None, filename: str) -> None:
    """List, create, delete or apply internal snapshots of a qcow2 image."""
    chosen = [name for name, value in (("-l", list_), ("-c", create), ("-d", delete), ("-a", apply)) if value]
    if len(chosen) > 1:
        raise ConfigError(f"Only one of -l, -c, -d, -a at a time (got {' '.join(chosen)})")
    if images.resolve_format(filename, None) != "qcow2":
        raise ConfigError(f"{filename}: only qcow2 images have internal snapshots")
    from hypervisor.block.qcow2 import Qcow2Image

    read_only = not (create or delete or apply)
    snap_image = Qcow2Image.open(filename, read_only=read_only, allow_backing=False)
    try:
        if create:
            snap_image.create_snapshot(create)
        elif delete:
            snap_image.delete_snapshot(delete)
        elif apply:
            snap_image.apply_snapshot(apply)
        else:
            snapshots = [images.snapshot_json(s) for s in snap_image.snapshots()]
            if snapshots:
                click.echo(image_output.snapshot_table(snapshots))
        if not read_only:
            snap_image.flush()
    finally:
        snap_image.close()


@command(name="resize", context_settings={"ignore_unknown_options": True})
@click.option("-f", "image_format", type=FORMAT_CHOICE)
@click.option("--shrink", is_flag=True, help="Allow making the image smaller.")
@click.argument("filename")
@click.argument("size")
def resize_command(image_format: str | None, shrink: bool, filename: str, size: str) -> None:
    """Set the virtual size to SIZE, or change it by +SIZE / -SIZE."""
    sign, amount = parse_relative_size(size)
    images.resize_image(filename, image_format, sign, amount, shrink)
    click.echo("Image resized.")


@command(name="rebase")
@click.option("-f", "image_format", type=FORMAT_CHOICE)
@click.option("-u", "unsafe", is_flag=True, help="Only rewrite the backing file name.")
@click.option("-b", "backing", required=True, help="New backing file ('' for none).")
@click.option("-F", "backing_format", type=FORMAT_CHOICE)
@click.option("-p", "progress", is_flag=True, help="Show a progress bar.")
@click.argument("filename")
def rebase_command(
    image_format: str | None, unsafe: bool, backing: str, backing_format: str | None, progress: bool, filename: str
) -> None:
    """Change the backing file; without -u, copy what differs so contents stay the same."""
    copying.rebase(filename, image_format, backing, backing_format, unsafe, _progress_printer(progress))
    if progress:
        click.echo("")


@command(name="commit")
@click.option("-f", "image_format", type=FORMAT_CHOICE)
@click.option("-d", "keep", is_flag=True, help="Keep the overlay's data after committing.")
@click.option("-p", "progress", is_flag=True, help="Show a progress bar.")
@click.argument("filename")
def commit_command(image_format: str | None, keep: bool, progress: bool, filename: str) -> None:
    """Write the overlay's own data into its backing file, then empty the overlay."""
    emptied = copying.commit(filename, image_format, keep, _progress_printer(progress))
    if progress:
        click.echo("")
    if not keep and not emptied:
        log.warning("%s kept its data (it has internal snapshots or an external data file)", filename)
    click.echo("Image committed.")


__all__ = ["image"]
