"""The one place that decides in which order qcow2 metadata reaches the disk.

Modelled on QEMU's block/qcow2-cache.c: every metadata cache is a step that declares which steps
must be durable before it is written (qcow2_cache_set_dependency: "L2 tables depend on refcount
blocks"), and the flush writes dirty steps in declaration order with a sync wherever a dependency
was written since the last one. The rule behind every dependency (qcow2.rst "Host cluster
management"): a reference is written only after the cluster's refcount is durable, and a
refcount goes down only after the reference is gone durably, so a crash between any two writes
leaves leaks at worst, never a reference to a cluster with refcount 0.

Two orders are built from it: the engine's flush (engine.py: refcounts, L2 tables, the L1 table,
the header when the L1 table moved, queued decrements) and a snapshot transaction's commit
(transaction.py: the shadow refcount structure, then the header switch).

Guest data is not tracked as dirty: `DATA` stands for whatever was written since the last flush
(to the image file, or to the external data file), and is made durable before any step that
depends on it and at the end of every flush (a flush is what makes guest writes durable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hypervisor.block.qcow2.hostfile import HostFile

DATA = "data"


@dataclass(frozen=True)
class FlushStep:
    name: str
    dirty: Callable[[], bool]
    write: Callable[[], None]  # writes to the image file; the order syncs
    after: tuple[str, ...]  # steps (or DATA) that must be durable first
    syncs_itself: bool = False  # `write` ends with the image file synced


class FlushOrder:
    """Dirty metadata written in dependency order; see the module doc."""

    def __init__(self, hf: HostFile, data_file: Callable[[], HostFile | None]) -> None:
        self._hf = hf
        self._data_file = data_file
        self._steps: list[FlushStep] = []

    def add(
        self,
        name: str,
        dirty: Callable[[], bool],
        write: Callable[[], None],
        after: tuple[str, ...] = (),
        syncs_itself: bool = False,
    ) -> None:
        known = {DATA, *(step.name for step in self._steps)}
        unknown = set(after) - known
        if unknown or name in known:
            raise ValueError(f"flush step {name!r}: unknown or later dependencies {sorted(unknown)}")
        self._steps.append(FlushStep(name, dirty, write, after, syncs_itself))

    @property
    def steps(self) -> tuple[str, ...]:
        return tuple(step.name for step in self._steps)

    def flush(self) -> None:
        """Write every dirty step, then make everything (guest data too) durable."""
        hf, data_file = self._hf, self._data_file()
        unsynced = {DATA}  # written to the image file since its last sync
        data_unsynced = data_file is not None
        for step in self._steps:
            if not step.dirty():
                continue
            if unsynced.intersection(step.after):
                hf.sync()
                unsynced.clear()
            if data_unsynced and DATA in step.after and data_file is not None:
                data_file.sync()
                data_unsynced = False
            step.write()
            if step.syncs_itself:
                unsynced.clear()
            else:
                unsynced.add(step.name)
        if unsynced:
            hf.sync()
        if data_unsynced and data_file is not None:
            data_file.sync()
