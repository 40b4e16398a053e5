"""Crash injection for the image tools: kill an operation at its Nth write, sync or rename.

`KillSwitch` wraps every call that changes a file (os.pwrite, os.pwritev, os.ftruncate, os.fsync,
os.fdatasync, os.replace, os.rename, os.unlink, fileio.fallocate, fileio.start_writeback) and
counts them. At the chosen point it raises `Killed` (a BaseException, so no `except Exception`
swallows it) and from then on refuses every further change too: cleanup in `finally` or `except
BaseException` blocks cannot run, exactly as after SIGKILL, where everything done before the
point is in the page cache and nothing after it happens.

`record_hostfile` / `power_loss_states` model power loss instead: the writes and syncs of one
image are recorded and replayed as the disk could have kept them (everything synced, plus any
subset of the writes since the last sync).
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hypervisor.block import fileio
from hypervisor.block.qcow2.hostfile import HostFile

_OS_CALLS = ("pwrite", "pwritev", "ftruncate", "fsync", "fdatasync", "replace", "rename", "unlink")
_FILEIO_CALLS = ("fallocate", "start_writeback")


class Killed(BaseException):
    """The simulated SIGKILL."""


class KillSwitch:
    """Counts changing calls; with `kill_at` set, the call with that index and all later ones fail.
    File descriptors opened meanwhile are tracked so that `exit` can close them as the kernel
    does for a killed process (which also drops its image locks)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None) -> None:
        self.kill_at = kill_at
        self.calls: list[str] = []
        self.killed = False
        self.open_fds: set[int] = set()
        self._lock = threading.Lock()
        for name in _OS_CALLS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        for name in _FILEIO_CALLS:
            monkeypatch.setattr(fileio, name, self._wrap(name, getattr(fileio, name)))
        original_open, original_close = os.open, os.close

        def tracked_open(*args: Any, **kwargs: Any) -> int:
            fd = original_open(*args, **kwargs)
            self.open_fds.add(fd)
            return fd

        def tracked_close(fd: int) -> None:
            self.open_fds.discard(fd)
            original_close(fd)

        monkeypatch.setattr(os, "open", tracked_open)
        monkeypatch.setattr(os, "close", tracked_close)
        self._close = original_close

    def exit(self) -> None:
        """The process is gone: its descriptors (and the locks on them) go too."""
        for fd in sorted(self.open_fds):
            try:
                self._close(fd)
            except OSError:
                pass
        self.open_fds.clear()

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                if self.killed or (self.kill_at is not None and len(self.calls) >= self.kill_at):
                    self.killed = True
                    raise Killed(name)
                self.calls.append(name)
            return original(*args, **kwargs)

        return call


def run_killed(monkeypatch: pytest.MonkeyPatch, operation: Callable[[], object], kill_at: int | None) -> KillSwitch:
    """Run `operation` with a kill switch; returns it (its `calls` are what happened)."""
    with monkeypatch.context() as patch:
        switch = KillSwitch(patch, kill_at)
        try:
            operation()
        except Killed:
            pass
        except Exception:
            if not switch.killed:
                raise
        finally:
            if switch.killed:
                switch.exit()
    return switch


def sample_points(total: int, limit: int, always: set[int] | None = None) -> list[int]:
    """Every point if there are at most `limit`, else the points in `always` and an even
    deterministic sample of the rest (both ends included) up to `limit`."""
    if total <= limit:
        return list(range(total))
    chosen = set(always or ()) | {0, total - 1}
    spare = max(2, limit - len(chosen))
    step = (total - 1) / (spare - 1)
    chosen |= {round(i * step) for i in range(spare)}
    return sorted(point for point in chosen if 0 <= point < total)


_DATA_CALLS = ("pwrite", "pwritev", "start_writeback", "fallocate")


def epoch_edges(calls: list[str]) -> set[int]:
    """Every sync, truncate and rename, and the writes next to each: killing there covers every
    metadata epoch (what was synced before, the first and the last write of the next one)."""
    edges: set[int] = set()
    for index, name in enumerate(calls):
        if name not in _DATA_CALLS:
            edges.update((index - 1, index, index + 1))
    return {index for index in edges if 0 <= index < len(calls)}


# -- power loss -------------------------------------------------------------------------------
Write = tuple[int, bytes]


def record_hostfile(monkeypatch: pytest.MonkeyPatch, path: str) -> list[Write | None]:
    """(offset, bytes) for each write and None for each sync made to `path` through HostFile."""
    ops: list[Write | None] = []
    original_pwritev, original_sync = HostFile.pwritev, HostFile.sync

    def pwritev(self: HostFile, offset: int, buffers: Any) -> None:
        if self.path == path:
            ops.append((offset, b"".join(bytes(b) for b in buffers)))
        original_pwritev(self, offset, buffers)

    def sync(self: HostFile) -> None:
        if self.path == path:
            ops.append(None)
        original_sync(self)

    monkeypatch.setattr(HostFile, "pwritev", pwritev)
    monkeypatch.setattr(HostFile, "sync", sync)
    return ops


def power_loss_states(ops: list[Write | None], seed: int, subsets_per_epoch: int = 4) -> Iterator[list[Write]]:
    """Every in-order prefix, and per sync epoch a few random subsets of its writes (reordering)."""
    rng = random.Random(seed)
    durable: list[Write] = []
    epoch: list[Write] = []
    for op in ops:
        if op is None:
            for _ in range(subsets_per_epoch if len(epoch) > 1 else 0):
                keep = sorted(rng.sample(range(len(epoch)), rng.randrange(len(epoch))))
                yield durable + [epoch[i] for i in keep]
            durable += epoch
            epoch = []
            continue
        epoch.append(op)
        yield durable + epoch
    yield durable + epoch


def apply_writes(initial: bytes, writes: list[Write]) -> bytes:
    image = bytearray(initial)
    for offset, data in writes:
        if offset + len(data) > len(image):
            image.extend(bytes(offset + len(data) - len(image)))
        image[offset : offset + len(data)] = data
    return bytes(image)
