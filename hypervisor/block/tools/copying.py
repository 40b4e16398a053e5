"""`pyhv image convert|rebase|commit`: the commands that copy data between images.

All three walk the source's allocation map (qemu-img map's extents) and move only ranges that
hold data, in large bounded chunks, skipping all-zero clusters so outputs stay sparse. Inputs are
validated and opened before an output is created or an image is changed. Nothing here prints;
progress goes to an optional callback(done_bytes, total_bytes).
"""

from __future__ import annotations

import logging
import os
import queue
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from hypervisor.block import extents
from hypervisor.block.capabilities import AllocationMap, HostFile, Resizable
from hypervisor.block.open import open_disk
from hypervisor.block.qcow2.create import Qcow2CreateOptions, create_qcow2, write_qcow2, write_raw
from hypervisor.block.qcow2.staging import staged
from hypervisor.block.tools.create_options import RAW_CREATE_KEYS, check_keys, qcow2_create_options
from hypervisor.block.tools.images import full_backing_filename, open_image, resolve_format
from hypervisor.errors import ConfigError, ImageError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# Bytes moved per read/write call: big enough that Python overhead is small next to the I/O.
COPY_CHUNK = 4 << 20
# Concurrent writers (qemu-img convert's default of 8 requests in flight, -m 8).
WRITE_WORKERS = 8
# Granularity of zero detection when no cluster size is known (QEMU convert's default min_sparse).
DEFAULT_SPARSE_GRANULARITY = 4096
# The target cache modes convert accepts (qemu-img's -t names); the others qemu-img knows (none,
# directsync, writethrough) need O_DIRECT or per-write syncs, which pyhv's block layer lacks.
CONVERT_CACHE_MODES = ("writeback", "unsafe")
DEFAULT_CONVERT_CACHE = "writeback"


# One shared all-zero buffer to compare against: allocating zeros per chunk costs a page fault per
# 4 KiB on every call, which dominates the copy on hosts where faults are expensive.
_ZEROS = memoryview(bytes(COPY_CHUNK))


def _no_progress(done: int, total: int) -> None:
    return None


def data_ranges(image: Any) -> Iterator[tuple[int, int, int]]:
    """(start, length, depth) of every range whose bytes are stored somewhere in the chain."""
    if isinstance(image, AllocationMap):
        for extent in image.map_extents():
            if extent.data:
                yield extent.start, extent.length, extent.depth
        return
    yield from ((start, length, 0) for start, length in _raw_data_ranges(image))


def _raw_data_ranges(image: Any) -> Iterator[tuple[int, int]]:
    """The data runs of a raw file (block/extents.py); the whole file if it has no descriptor."""
    size = image.size
    if not isinstance(image, HostFile):
        if size:
            yield 0, size
        return
    yield from extents.data_ranges(image.fd, 0, size)


def zero_and_data_runs(view: memoryview, granularity: int) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, is_zero) runs of `view`, decided per `granularity` bytes."""
    if len(view) <= len(_ZEROS) and view == _ZEROS[: len(view)]:  # one memcmp for an all-zero chunk
        yield 0, len(view), True
        return
    zero_block = _ZEROS[:granularity] if granularity <= len(_ZEROS) else memoryview(bytes(granularity))
    run_start, run_zero = 0, None
    n = len(view)
    for position in range(0, n, granularity):
        piece = view[position : position + granularity]
        is_zero = piece == zero_block[: len(piece)]
        if run_zero is not None and is_zero != run_zero:
            yield run_start, position - run_start, run_zero
            run_start = position
        run_zero = is_zero
    if n:
        yield run_start, n - run_start, bool(run_zero)


def copy_data(
    source: Any,
    target: Any,
    granularity: int,
    compress: bool = False,
    cluster_size: int = 0,
    progress: Progress = _no_progress,
    ranges: Iterator[tuple[int, int, int]] | None = None,
    write_zeroes: bool = False,
    write_back: bool = True,
) -> None:
    """Copy the data ranges of `source` into `target`. All-zero runs are skipped (the target
    must read as zeros there already) or, with `write_zeroes`, written as zeroes. `write_back`
    starts the page cache's write-back chunk by chunk (raw targets), for a short final flush;
    a copy that will not be flushed (`convert -t unsafe`) leaves that to the kernel.

    This thread reads chunk after chunk; a small pool writes them, because on Linux one writer
    into the page cache is far slower than several (qemu-img convert also keeps 8 requests in
    flight). preadv/pwritev release the GIL; buffers are bounded, so memory stays at
    (WRITE_WORKERS + 2) chunks.
    """
    total = source.size
    free_buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(WRITE_WORKERS + 2):
        free_buffers.put(bytearray(COPY_CHUNK))

    # Backends that can (raw files) start write-back per chunk, so the final flush is short.
    start_writeback = target.start_writeback if write_back and isinstance(target, HostFile) else None

    def write_chunk(buffer: bytearray, offset: int, n: int) -> None:
        try:
            view = memoryview(buffer)[:n]
            for run, run_length, is_zero in zero_and_data_runs(view, granularity):
                if not is_zero:
                    _write_run(target, offset + run, view[run : run + run_length], compress, cluster_size)
                elif write_zeroes:
                    target.write_zeroes(offset + run, run_length)
            if start_writeback is not None:
                start_writeback(offset, n)
        finally:
            free_buffers.put(buffer)

    in_flight: deque[Future[None]] = deque()
    with ThreadPoolExecutor(WRITE_WORKERS, thread_name_prefix="pyhv-copy") as pool:
        try:
            for start, length, _depth in ranges if ranges is not None else data_ranges(source):
                offset, end = start, start + length
                while offset < end:
                    n = min(COPY_CHUNK, end - offset)
                    if compress:  # keep chunks cluster aligned so whole clusters can be compressed
                        n = min(n, COPY_CHUNK - offset % cluster_size)
                    buffer = free_buffers.get()
                    source.readinto(offset, [memoryview(buffer)[:n]])
                    in_flight.append(pool.submit(write_chunk, buffer, offset, n))
                    while in_flight and in_flight[0].done():
                        in_flight.popleft().result()  # re-raises a writer's error here
                    offset += n
                    progress(offset, total)
        finally:
            for future in in_flight:  # wait for every writer, even when failing
                future.exception()
        for future in in_flight:
            future.result()
    progress(total, total)


def _write_run(target: Any, offset: int, data: memoryview, compress: bool, cluster_size: int) -> None:
    if not compress:
        target.write(offset, [data])
        return
    position = 0
    while position < len(data):
        cluster_offset = offset + position
        in_cluster = min(len(data) - position, cluster_size - cluster_offset % cluster_size)
        piece = data[position : position + in_cluster]
        if in_cluster == cluster_size and cluster_offset + cluster_size <= target.size:
            target.write_compressed(cluster_offset, bytes(piece))
        else:  # a partial cluster (image tail) is stored uncompressed
            target.write(cluster_offset, [piece])
        position += in_cluster


def convert(
    source_path: str,
    target_path: str,
    source_format: str | None,
    target_format: str,
    compress: bool,
    options: dict[str, str],
    snapshot: str | None = None,
    progress: Progress = _no_progress,
    cache: str = DEFAULT_CONVERT_CACHE,
) -> None:
    """qemu-img convert: a new image `target_path` with the contents of `source_path`.

    `cache` is the target's cache mode (qemu-img's `-t`): "writeback", pyhv's default, flushes
    the target and syncs it and its folder before it takes the target's name, so a host crash
    leaves the old target or the complete new one; "unsafe", qemu-img's default for convert
    (qemu-img.c sets it unless -t is given; it makes no fdatasync), skips those syncs and the
    write-back hints. A qcow2 target's metadata is always written in dependency order with its
    syncs (the engine's flush), so only raw targets get faster with "unsafe".
    """
    if cache not in CONVERT_CACHE_MODES:
        raise ConfigError(f"Cache mode '{cache}' is not supported by pyhv convert (writeback or unsafe)")
    durable = cache == "writeback"
    if target_format not in ("raw", "qcow2"):
        raise ConfigError(f"Unknown output format '{target_format}' (qcow2 or raw)")
    if compress and target_format != "qcow2":
        raise ConfigError("Compression not supported for this file format (use -O qcow2)")
    if os.path.exists(target_path) and os.path.realpath(target_path) == os.path.realpath(source_path):
        raise ConfigError("Source and target are the same file")
    source = open_image(source_path, source_format, read_only=True, snapshot=snapshot)
    try:
        qcow2_options = None
        if target_format == "qcow2":
            if "backing_file" in options or "backing_fmt" in options:
                raise ConfigError("convert does not write backing files; create an overlay afterwards")
            qcow2_options = qcow2_create_options(options, source.size, None, None)
        else:
            check_keys(options, RAW_CREATE_KEYS, "raw")
            if options.get("preallocation", "off") != "off":
                raise ConfigError("raw preallocation modes other than off are not supported")
        # Built under a temporary name and renamed over the target once complete (staging.py):
        # a crash leaves the old target, or nothing, and at most a temporary the next run removes.
        with staged(target_path, "convert") as stage:
            _create(stage.path, target_format, qcow2_options, source.size, target_path, sync=durable)
            target = open_disk(stage.path, format=target_format, read_only=False, allow_backing=False)
            try:
                cluster_size = qcow2_options.cluster_size if qcow2_options else 0
                granularity = cluster_size if compress else DEFAULT_SPARSE_GRANULARITY
                copy_data(source, target, granularity, compress, cluster_size, progress, write_back=durable)
                if durable or target_format == "qcow2":
                    target.flush()
                stage.commit(durable=durable)
            finally:
                target.close()
    finally:
        source.close()


def _create(
    path: str, image_format: str, options: Qcow2CreateOptions | None, size: int, shown_as: str, sync: bool = True
) -> None:
    if image_format == "qcow2":
        assert options is not None
        write_qcow2(path, options, shown_as)
    else:
        write_raw(path, size, shown_as, sync=sync)


def rebase(
    path: str,
    image_format: str | None,
    backing: str,
    backing_format: str | None,
    unsafe: bool,
    progress: Progress = _no_progress,
) -> None:
    """qemu-img rebase. Safe mode first copies into the overlay every cluster where the old and
    the new backing chain differ, so the guest-visible contents do not change."""
    if resolve_format(path, image_format) != "qcow2":
        raise ConfigError(f"{path}: only qcow2 images have a backing file to rebase")
    new_backing = backing or None
    if new_backing is not None:
        resolved = full_backing_filename(path, new_backing)
        backing_format = (
            resolve_format(resolved, backing_format) if os.path.exists(resolved) or not unsafe else backing_format
        )
        if backing_format is None:
            raise ConfigError("-F is needed when the new backing file does not exist (-u)")
    from hypervisor.block.qcow2 import Qcow2Image

    if unsafe:
        image = Qcow2Image.open(path, read_only=False, allow_backing=False)
        try:
            image.set_backing(new_backing, backing_format if new_backing else None)
            image.flush()
        finally:
            image.close()
        return
    image = Qcow2Image.open(path, read_only=False, allow_backing=True)
    try:
        new = (
            open_disk(
                full_backing_filename(path, new_backing), format=backing_format, read_only=True, allow_backing=True
            )
            if new_backing
            else None
        )
        try:
            _copy_differences(image, new, progress)
        finally:
            if new is not None:
                new.close()
        image.set_backing(new_backing, backing_format if new_backing else None)
        image.flush()
    finally:
        image.close()


def _copy_differences(image: Any, new_backing: Any, progress: Progress) -> None:
    """Write into `image` every range not allocated in it where old and new backing differ."""
    size = image.size
    cluster = image.cluster_size
    old_buf, new_buf = bytearray(COPY_CHUNK), bytearray(COPY_CHUNK)
    pending = [(e.start, e.length) for e in image.map_extents() if not (e.depth == 0 and e.present)]
    for start, length in pending:
        offset, end = start, start + length
        while offset < end:
            n = min(COPY_CHUNK, end - offset)
            old_view, new_view = memoryview(old_buf)[:n], memoryview(new_buf)[:n]
            image.readinto(offset, [old_view])
            new_view[:] = _ZEROS[:n]
            if new_backing is not None and offset < new_backing.size:
                readable = min(n, new_backing.size - offset)
                new_backing.readinto(offset, [new_view[:readable]])
            if old_view != new_view:
                position = 0
                while position < n:  # cluster by cluster, so only differing clusters are written
                    step = min(n - position, cluster - (offset + position) % cluster)
                    if old_view[position : position + step] != new_view[position : position + step]:
                        image.write(offset + position, [old_view[position : position + step]])
                    position += step
            offset += n
            progress(offset, size)


def commit(path: str, image_format: str | None, keep_overlay: bool, progress: Progress = _no_progress) -> bool:
    """qemu-img commit: write the overlay's own data into its backing file, then empty the overlay
    (unless `keep_overlay`). Returns whether the overlay was emptied."""
    if resolve_format(path, image_format) != "qcow2":
        raise ConfigError(f"{path}: only qcow2 images have a backing file to commit into")
    from hypervisor.block.qcow2 import Qcow2Image

    # The overlay is opened without its chain: the backing file is opened once, read-write, below.
    overlay = Qcow2Image.open(path, read_only=True, allow_backing=False)
    try:
        if overlay.backing_filename is None:
            raise ConfigError(f"{path}: image has no backing file to commit into")
        backing_path = full_backing_filename(path, overlay.backing_filename)
        backing = open_disk(backing_path, format=overlay.backing_format, read_only=False, allow_backing=True)
        try:
            if backing.size < overlay.size:
                _grow(backing, overlay.size)
            own = [e for e in overlay.map_extents() if e.depth == 0 and e.present]
            # Zeros in the overlay hide backing data: they become zeros in the backing too.
            for extent in own:
                if not extent.data:
                    backing.write_zeroes(extent.start, extent.length)
            copy_data(
                overlay,
                backing,
                DEFAULT_SPARSE_GRANULARITY,
                progress=progress,
                ranges=iter([(e.start, e.length, 0) for e in own if e.data]),
                write_zeroes=True,
            )
            backing.flush()
        finally:
            backing.close()
        can_empty = not keep_overlay and not overlay.snapshots() and overlay.data_file_name is None
        backing_format = overlay.backing_format or resolve_format(backing_path, None)
        recreate = _recreate_options(overlay, backing_format) if can_empty else None
    finally:
        overlay.close()
    if recreate is not None:
        _replace_atomically(path, recreate)
    return recreate is not None


def _grow(image: Any, size: int) -> None:
    if isinstance(image, Resizable):
        image.resize(size)
    elif isinstance(image, HostFile):
        os.ftruncate(image.fd, size)
    else:
        raise ImageError(f"{image!r} cannot change its size")


def _recreate_options(image: Any, backing_format: str) -> Qcow2CreateOptions:
    """Create options reproducing `image`'s format with nothing allocated (qcow2 make_empty)."""
    from hypervisor.block.qcow2 import format as fmt

    header = image.header
    return Qcow2CreateOptions(
        size=image.size,
        cluster_size=image.cluster_size,
        compat="0.10" if header.version < 3 else "1.1",
        lazy_refcounts=bool(header.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS),
        extended_l2=header.extended_l2,
        refcount_bits=header.refcount_bits,
        compression_type=fmt.COMPRESSION_NAMES.get(header.compression_type, "zlib"),
        backing_file=image.backing_filename,
        backing_format=backing_format,
    )


# Temporaries of pyhv versions before staging.py (tempfile.mkstemp's 8 random characters).
_LEGACY_COMMIT_TEMPORARY = re.compile(r"\.pyhv-commit-[a-z0-9_]{8}")


def _replace_atomically(path: str, options: Qcow2CreateOptions) -> None:
    """Write the empty image next to `path`, then rename it over: a crash leaves one or the other,
    and the temporary of an interrupted commit is removed by the next commit of the same image."""
    create_qcow2(path, options, purpose="commit", legacy=_LEGACY_COMMIT_TEMPORARY)


__all__ = ["convert", "rebase", "commit", "copy_data", "data_ranges"]
