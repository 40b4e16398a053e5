"""`pyhv run`: boot a guest and wait for its outcome; the exit status says how it ended."""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING

import click

from hypervisor.cli.run_debug_outputs import DebugOutputs, debug_output_options
from hypervisor.console import FileConsole, NullConsole, StdioConsole
from hypervisor.devices import PCI_DEVICE_TYPES
from hypervisor.errors import ConfigError, HypervisorError
from hypervisor.process_signals import sigterm_raises
from hypervisor.units import parse_size

if TYPE_CHECKING:
    from hypervisor.debug.gdb.server import GdbServer
    from hypervisor.disk_overlays import DiskSession
    from hypervisor.launch import RunOptions
    from hypervisor.machine import Machine

log = logging.getLogger(__name__)

PVM_NOTICE = (
    "this host's KVM is kvm_pvm: guest kernel code runs in KVM's instruction emulator (a Linux "
    "boot takes tens of seconds to minutes), a stock kernel's user space cannot make system calls (the bundled "
    "guest carries a patch for that), and guest debugging is limited; see docs/booting.md"
)
MAX_MEMORY_MIB = 1 << 20  # 1 TiB: beyond that a typo is likelier than a wish


def _parse_raw(value: str | None) -> tuple[Path, int] | None:
    if value is None:
        return None
    path, separator, address = value.rpartition("@")
    if not separator or not path:
        raise ConfigError(f"--raw wants FILE@ADDRESS (for example guest.bin@0x1000), not {value!r}")
    try:
        return Path(path), int(address, 0)
    except ValueError as error:
        raise ConfigError(f"--raw address {address!r} is not a number") from error


def _parse_memory(value: str | None) -> int | None:
    if value is None:
        return None
    size = parse_size(value, default_unit="M", what="--mem")
    mib, remainder = divmod(size, 1 << 20)
    if remainder or mib <= 0:
        raise ConfigError(f"--mem {value} must be a positive whole number of MiB")
    if mib > MAX_MEMORY_MIB:
        raise ConfigError(f"--mem {value} is more than pyhv allows ({MAX_MEMORY_MIB // 1024} GiB)")
    return mib


def _make_console(spec: str) -> object:
    if spec == "stdio":
        return StdioConsole()
    if spec == "none":
        return NullConsole()
    if spec.startswith("file:") and len(spec) > 5:
        return FileConsole(spec[5:])
    raise ConfigError(f"--console {spec!r}: use stdio, none or file:PATH")


@click.command()
@click.option("--kernel", type=click.Path(path_type=Path),
              help="Linux bzImage or vmlinux (may be .xz), or a multiboot ELF. Default: the bundled guest.")
@click.option("--initrd", type=click.Path(path_type=Path),
              help="initramfs (may be .xz). Default with the bundled kernel: its initramfs.")
@click.option("--append", help="Extra kernel command-line words, after pyhv's defaults.")
@click.option("--raw", "raw", metavar="FILE@ADDR",
              help="A flat binary loaded at ADDR and started in real mode (CS=0, IP=ADDR).")
@click.option("--mem", "memory", metavar="SIZE",
              help="Guest RAM: 256M, 1G; a bare number is MiB. Default 256M for Linux, 16M for --raw.")
@click.option("--cpus", default=1, show_default=True, type=click.IntRange(1, 255), help="Number of vCPUs.")
@click.option("--console", "console_spec", default="stdio", show_default=True, metavar="stdio|file:PATH|none",
              help="Where the guest's serial console goes.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="End the run after this many seconds (exit status 124).")
@click.option("--max-exits", "max_exits", metavar="N|KIND=N,...",
              help="End the run (exit status 118) once the guest makes more VM exits than this: a total, or "
                   "per kind (io=1000000,mmio=50000,total=...). Checked every quarter second.")
@click.option("--report", type=click.Path(path_type=Path, dir_okay=False), help="Write a JSON summary of the run here.")
@click.option("--disk", "disks", multiple=True, metavar="PATH[,format=raw|qcow2][,readonly=on][,serial=S]",
              help="A virtio-blk disk (repeatable: vda, vdb, ...); snapshot=on or overlay=FILE keep PATH unwritten.")
@click.option("--snapshot", is_flag=True,
              help="Every writable disk runs on a temporary overlay, deleted after the run (docs/ci.md).")
@click.option("--fault", "faults", multiple=True, metavar="DISK:OP:K:ACTION[,...]",
              help="Spoil the Kth OP request to DISK, e.g. vda:write:3:eio,after=PATTERN (docs/ci.md).")
@click.option("--root", help="Boot with this disk as the root file system, e.g. /dev/vda.")
@click.option("--debug-exit-port", default="0x501", show_default=True, help="Port of the debug-exit device.")
@click.option("--debug-exit-qemu", is_flag=True, help="QEMU isa-debug-exit semantics: status = (value << 1) | 1.")
@click.option("--hugepages", is_flag=True, help="Back guest RAM with 2 MiB huge pages (reserved on the host).")
@click.option("--trace-exits", type=click.Path(path_type=Path, dir_okay=False),
              help="Write every VM exit that reaches Python to this file, one line each.")
@click.option("--pvh", is_flag=True, help="Enter an ELF vmlinux through its PVH entry point.")
@click.option("--gdb", "gdb_spec", metavar="tcp:HOST:PORT|unix:PATH",
              help="Serve gdb's remote protocol; the guest waits for gdb before its first instruction.")
@click.option("--machine", "machine_type", type=click.Choice(["pc", "qemu-test"]), default="pc", show_default=True,
              help="qemu-test adds QEMU's isa-debug-exit (0xf4) and pc-testdev, for kvm-unit-tests "
                   "(docs/conformance.md).")
@click.option("--device", "pci_devices", multiple=True, type=click.Choice(PCI_DEVICE_TYPES),
              help="A PCI device (repeatable): QEMU's edu test device, or an Intel VT-d IOMMU with DMA "
                   "and interrupt remapping (docs/conformance.md).")
@click.option("--save", type=click.Path(path_type=Path, file_okay=False),
              help="Save the running machine to this new folder when --save-on matches; the run goes on.")
@click.option("--save-on", metavar="PATTERN", help="Save (see --save) the first time the console prints PATTERN.")
@click.option("--save-on-request", is_flag=True, help="Save (see --save) when the guest writes port 0x50a.")
@click.option("--save-then", type=click.Choice(["continue", "stop"]), default="continue", show_default=True,
              help="After --save: the run goes on (on new disk overlays) or ends with outcome saved (status 0).")
@click.option("--restore", type=click.Path(path_type=Path, file_okay=False),
              help="Continue a machine saved with --save instead of booting (docs/snapshots.md).")
@click.option("--disk-overlay", type=click.Path(path_type=Path, file_okay=False),
              help="With --restore: the folder for each disk's fresh overlay (kept); default: a temporary one.")
@debug_output_options
def run(**options: object) -> None:
    """Boot a guest and run it until it stops.

    \b
    Exit status: the guest's debug-exit value when it used that port; 0 when it powered off,
    reset or the console quit (Ctrl-A x); 118 over its --max-exits budget, 119 halted for good
    (cli; hlt), 120 triple fault, 121 kernel panic, 122 emulation failure, 123 other KVM
    internal error, 124 timeout, 130 interrupted; 1 hypervisor error, 2 usage error, 3 bad
    input (file, size, image), 4 KVM unavailable. See docs/exit-status.md.
    """
    sys.exit(_run(options))


def run_options_from(options: dict[str, object]) -> RunOptions:
    """The RunOptions of the options `pyhv run` and `pyhv debug` share (their names are the same)."""
    from hypervisor.launch import RunOptions

    port_text = str(options["debug_exit_port"])
    try:
        debug_port = int(port_text, 0)
    except ValueError as error:
        raise ConfigError(f"--debug-exit-port {port_text!r} is not a number") from error
    if not 0 <= debug_port <= 0xFFFF:
        raise ConfigError(f"--debug-exit-port {port_text} is not a port number (0-0xffff)")
    return RunOptions(
        kernel=options["kernel"],  # type: ignore[arg-type]
        initrd=options["initrd"],  # type: ignore[arg-type]
        append=options["append"],  # type: ignore[arg-type]
        raw=_parse_raw(options["raw"]),  # type: ignore[arg-type]
        memory_mib=_parse_memory(options["memory"]),  # type: ignore[arg-type]
        cpus=int(options["cpus"]),  # type: ignore[call-overload]
        timeout=options["timeout"],  # type: ignore[arg-type]
        debug_exit_port=debug_port,
        debug_exit_qemu=bool(options["debug_exit_qemu"]),
        pvh=bool(options["pvh"]),
        hugepages=bool(options["hugepages"]),
        disks=_parse_disks(options["disks"]),  # type: ignore[arg-type]
        root=options["root"],  # type: ignore[arg-type]
        machine=str(options["machine_type"]),
        pci_devices=tuple(options.get("pci_devices", ())),  # type: ignore[arg-type]
    )


def _run(options: dict[str, object]) -> int:
    from hypervisor.launch import LaunchInfo, create_machine
    from hypervisor.report import build_report, write_report

    machine = None
    disk_session = None
    # SIGTERM (and Ctrl-C) from the very start: one arriving while the machine is being built
    # still ends in status 130 with the temporary overlays removed, never a traceback. A stack,
    # not a `with`, so that the old handler is back before the overlays go (below).
    signals = ExitStack()
    signals.enter_context(sigterm_raises())
    try:
        run_options = run_options_from(options)
        if options["report"]:
            from hypervisor.output_paths import check_writable_file

            check_writable_file(options["report"], "--report")  # type: ignore[arg-type]
        from hypervisor.cli import snapshot_options

        snapshot_options.check_save_options(options["save"], options["save_on"], bool(options["save_on_request"]))  # type: ignore[arg-type]
        debug_outputs = DebugOutputs(options)  # --trace, --post-mortem, --kernel-symbols: checked before the run
        run_options.exit_history = debug_outputs.exit_history
        if options["disk_overlay"] is not None and options["restore"] is None:
            raise ConfigError("--disk-overlay DIR goes with --restore PATH")
        exit_budget = None
        if options["max_exits"] is not None:
            from hypervisor.ci.exit_budget import ExitBudget

            exit_budget = ExitBudget.parse(str(options["max_exits"]))
        console = _make_console(str(options["console_spec"]))
        if options["restore"] is not None:
            if options["faults"] or options["snapshot"]:
                raise ConfigError("--restore gives each disk a fresh overlay: it takes no --snapshot or --fault")
            if options["kernel"] or options["initrd"] or options["raw"] or options["disks"] or options["append"]:
                raise ConfigError("--restore continues a saved machine: it takes no --kernel, --initrd, --raw, --disk "
                                  "or --append")
            machine = snapshot_options.restore(options["restore"], console, options["disk_overlay"])  # type: ignore[arg-type]
            info = LaunchInfo("restored", str(options["restore"]), pvm_host=machine.emulator is not None)
        else:
            disk_session = _disk_session(run_options, options)
            machine, info = create_machine(run_options, console, disk_session)  # type: ignore[arg-type]
        machine.exit_budget = exit_budget
        if options["save"] is not None:
            snapshot_options.arm_save(machine, options["save"], options["save_on"], bool(options["save_on_request"]),  # type: ignore[arg-type]
                                      stop_after=options["save_then"] == "stop")
        if info.pvm_host and info.kind == "linux":
            click.echo(f"pyhv: note: {PVM_NOTICE}", err=True)
        trace = _open_trace(options["trace_exits"])  # type: ignore[arg-type]
        if trace is not None:
            from hypervisor.debug.trace import ExitTracer  # only when asked: start-up is a target

            machine.add_exit_hook(ExitTracer(trace))
        debug_outputs.attach(machine)
        gdb = _start_gdb(options["gdb_spec"], machine)  # type: ignore[arg-type]
        try:
            if gdb is not None:
                machine.start(paused=True)  # the first instruction waits for gdb to continue
                result = machine.wait(run_options.timeout)
            else:
                result = machine.run(run_options.timeout)
            debug_outputs.collect(machine, result)  # vCPUs stopped, fds still open
        finally:
            if gdb is not None:
                gdb.close()
            machine.close()
            if trace is not None:
                trace.close()
            debug_outputs.close()
        click.echo(f"\npyhv: {result.outcome.describe()} (exit status {result.exit_status})", err=True)
        debug_outputs.finish(result, info, machine.observer.timeline())
        if options["report"]:
            try:
                disks = disk_session.report() if disk_session is not None else None
                report = build_report(result, info, machine.observer.timeline(), debug_outputs.report_section(), disks)
                write_report(options["report"], report)  # type: ignore[arg-type]
            except OSError as error:
                # The outcome is already said and stays the exit status: the report is extra.
                click.echo(f"pyhv: error: cannot write the report {options['report']}: {error.strerror}", err=True)
    except HypervisorError as error:
        if machine is not None:
            machine.close()
        click.echo(f"pyhv: error: {error}", err=True)
        return error.exit_status
    except OSError as error:
        click.echo(f"pyhv: error: {error}", err=True)
        return 1
    except KeyboardInterrupt:  # SIGINT or SIGTERM before the run (during it, wait() handles them)
        if machine is not None:
            machine.close()
        click.echo("pyhv: interrupted (exit status 130)", err=True)
        return 130
    except Exception as error:  # a bug of ours: one line for the user, the traceback with -vv
        log.debug("unexpected error", exc_info=True)
        click.echo(f"pyhv: internal error: {error!r} (run with -vv for the traceback)", err=True)
        return 1
    finally:
        signals.close()
        if disk_session is not None:
            disk_session.close()  # temporary overlays go, whatever ended the run
    return result.exit_status


def _disk_session(run_options: RunOptions, options: dict[str, object]) -> DiskSession | None:
    """The run's overlays, write sets and faults (hypervisor/disk_overlays.py), entered."""
    if not run_options.disks:
        if options["faults"]:
            raise ConfigError("--fault needs a --disk to spoil")
        return None
    from hypervisor.disk_overlays import DiskSession
    from hypervisor.faults import parse_fault_spec

    rules = [parse_fault_spec(text) for text in options["faults"]]  # type: ignore[attr-defined]
    return DiskSession(run_options.disks, snapshot_all=bool(options["snapshot"]), faults=rules).__enter__()


def _open_trace(path: Path | None) -> IO[str] | None:
    if path is None:
        return None
    try:
        return open(path, "w", buffering=1 << 16)
    except OSError as error:
        raise ConfigError(f"cannot write the exit trace {path}: {error.strerror}") from error


def _start_gdb(spec: str | None, machine: Machine) -> GdbServer | None:
    if spec is None:
        return None
    from hypervisor.debug.gdb.server import serve_machine

    server = serve_machine(machine, spec)
    where = server.describe()
    connect = where.split(":", 1)[1]  # gdb takes HOST:PORT, or a unix socket by its path
    click.echo(f"pyhv: waiting for gdb on {where} (gdb: target remote {connect})", err=True)
    return server


def _parse_disks(values: tuple[str, ...]) -> list[object]:
    if not values:
        return []
    from hypervisor.disk_spec import parse_disk_spec

    return [parse_disk_spec(value) for value in values]
