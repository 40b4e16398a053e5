"""virtio-blk requests (virtio 1.2 §5.2.6): parse a descriptor chain, then run it on a backend.

Parsing only cuts the chain into header, payload and status byte; execution checks the request
against the disk and turns every failure into a status byte for the driver. Payloads stay as
memoryviews into guest RAM, so preadv/pwritev move data straight between the file and the guest.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass

from hypervisor.block.backend import BlockBackend
from hypervisor.errors import HypervisorError
from hypervisor.virtio.iovec import gather, scatter, slice_views, total_length
from hypervisor.virtio.queue import DescriptorChain, VirtqueueError

log = logging.getLogger(__name__)

SECTOR_SIZE = 512  # §5.2.6: "sector" is always 512 bytes, whatever blk_size says
ID_BYTES = 20  # §5.2.6: GET_ID returns a 20-byte string, NUL-padded

# §5.2.6 struct virtio_blk_req: le32 type, le32 reserved, le64 sector.
REQUEST_HEADER = struct.Struct("<IIQ")
# §5.2.6 struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
SEGMENT = struct.Struct("<QII")
SEGMENT_FLAG_UNMAP = 1

# §5.2.6 request types.
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13

# §5.2.6 status values.
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

REQUEST_NAMES = {
    T_IN: "IN",
    T_OUT: "OUT",
    T_FLUSH: "FLUSH",
    T_GET_ID: "GET_ID",
    T_DISCARD: "DISCARD",
    T_WRITE_ZEROES: "WRITE_ZEROES",
}


class RequestFailed(Exception):
    """Ends one request with `status`; never leaves this module."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class BlockRequest:
    """A chain cut into the parts of §5.2.6: header, payload (in or out) and the status byte."""

    head: int
    type: int
    sector: int
    out_data: list[memoryview]  # device-readable payload after the header
    in_data: list[memoryview]  # device-writable payload before the status byte
    status: memoryview  # the last writable byte of the chain
    header_valid: bool

    @property
    def name(self) -> str:
        return REQUEST_NAMES.get(self.type, f"type {self.type}")


def parse_request(chain: DescriptorChain) -> BlockRequest:
    """Cut `chain` into a BlockRequest. VirtqueueError if there is not even a status byte."""
    if chain.writable_length < 1:
        raise VirtqueueError(f"virtio-blk request at head {chain.head} has no writable status byte")
    status = slice_views(chain.writable, chain.writable_length - 1)[0]
    in_data = slice_views(chain.writable, 0, chain.writable_length - 1)
    header_valid = chain.readable_length >= REQUEST_HEADER.size
    if header_valid:
        request_type, _reserved, sector = REQUEST_HEADER.unpack(gather(chain.readable, REQUEST_HEADER.size))
    else:
        request_type, sector = -1, 0
    out_data = slice_views(chain.readable, REQUEST_HEADER.size)
    return BlockRequest(chain.head, request_type, sector, out_data, in_data, status, header_valid)


@dataclass
class BlockLimits:
    """What the device advertised in its config space (§5.2.4) and negotiated (§5.2.3)."""

    capacity_sectors: int
    read_only: bool
    serial: bytes
    discard: bool
    write_zeroes: bool
    max_discard_sectors: int
    max_discard_segments: int
    max_write_zeroes_sectors: int
    max_write_zeroes_segments: int


class RequestExecutor:
    """Runs parsed requests against a backend; each returns the bytes written for the used ring."""

    def __init__(self, backend: BlockBackend, limits: BlockLimits, name: str) -> None:
        self.backend = backend
        self.limits = limits
        self.name = name
        self._backend_error_logged = False
        self.backend_errors = 0

    def execute(self, request: BlockRequest) -> int:
        """Run `request`, write its status byte, return the used length (payload + status)."""
        written = 0
        try:
            written = self._dispatch(request)
            status = S_OK
        except RequestFailed as failure:
            status = failure.status
            log.debug("%s: %s at sector %d: %s", self.name, request.name, request.sector, str(failure))
        except (OSError, ValueError, HypervisorError) as error:
            status = S_IOERR
            self.backend_errors += 1
            if not self._backend_error_logged:
                self._backend_error_logged = True
                log.error(
                    "%s: %s at sector %d failed: %s (further errors logged at debug level)",
                    self.name,
                    request.name,
                    request.sector,
                    str(error),  # not the exception: its traceback would pin guest memory views
                )
            else:
                log.debug("%s: %s at sector %d failed: %s", self.name, request.name, request.sector, str(error))
        request.status[0] = status
        return written + 1

    def _dispatch(self, request: BlockRequest) -> int:
        if not request.header_valid:
            raise RequestFailed(S_IOERR, "request header shorter than 16 readable bytes")
        if request.type == T_IN:
            return self._read(request)
        if request.type == T_OUT:
            self._write(request)
        elif request.type == T_FLUSH:
            self.backend.flush()
        elif request.type == T_GET_ID:
            return scatter(request.in_data, self.limits.serial)
        elif request.type == T_DISCARD and self.limits.discard:
            self._discard_or_zero(request, discard=True)
        elif request.type == T_WRITE_ZEROES and self.limits.write_zeroes:
            self._discard_or_zero(request, discard=False)
        else:
            raise RequestFailed(S_UNSUPP, "unsupported request type")
        return 0

    def _byte_range(self, sector: int, length: int) -> int:
        """The byte offset of `sector`, after checking [sector, +length) lies on the disk."""
        if length % SECTOR_SIZE:
            # §5.2.6.1: "The length of data MUST be a multiple of 512 bytes" for IN and OUT.
            raise RequestFailed(S_IOERR, f"payload of {length} bytes is not a multiple of {SECTOR_SIZE}")
        if sector + length // SECTOR_SIZE > self.limits.capacity_sectors:
            raise RequestFailed(S_IOERR, f"{length} bytes past the capacity of {self.limits.capacity_sectors} sectors")
        return sector * SECTOR_SIZE

    def _read(self, request: BlockRequest) -> int:
        length = total_length(request.in_data)
        offset = self._byte_range(request.sector, length)
        if length:
            self.backend.readinto(offset, request.in_data)
        return length

    def _write(self, request: BlockRequest) -> None:
        if self.limits.read_only:
            raise RequestFailed(S_IOERR, "write to a read-only disk")
        offset = self._byte_range(request.sector, total_length(request.out_data))
        if request.out_data:
            self.backend.write(offset, request.out_data)

    def _discard_or_zero(self, request: BlockRequest, discard: bool) -> None:
        """§5.2.6.2: a table of segments; each is checked before any is run."""
        if self.limits.read_only:
            raise RequestFailed(S_IOERR, "discard or write-zeroes on a read-only disk")
        limits = self.limits
        if discard:
            max_segments, max_sectors = limits.max_discard_segments, limits.max_discard_sectors
        else:
            max_segments, max_sectors = limits.max_write_zeroes_segments, limits.max_write_zeroes_sectors
        length = total_length(request.out_data)
        count = length // SEGMENT.size
        # Checked before copying: a guest may hand in gigabytes of "segments".
        if not length or length % SEGMENT.size or count > max_segments:
            raise RequestFailed(S_UNSUPP, f"{length} bytes of segments (at most {max_segments})")
        payload = gather(request.out_data, length)
        ranges = []
        for index in range(count):
            sector, sectors, flags = SEGMENT.unpack_from(payload, index * SEGMENT.size)
            # §5.2.6.2 device requirements: unknown flags, and unmap on a discard, are UNSUPP.
            if flags & ~SEGMENT_FLAG_UNMAP or (discard and flags & SEGMENT_FLAG_UNMAP):
                raise RequestFailed(S_UNSUPP, f"segment flags {flags:#x}")
            if sectors > max_sectors:
                raise RequestFailed(S_IOERR, f"segment of {sectors} sectors exceeds {max_sectors}")
            ranges.append((self._byte_range(sector, sectors * SECTOR_SIZE), sectors * SECTOR_SIZE))
        for offset, length in ranges:
            if length == 0:
                continue
            if discard:
                self.backend.discard(offset, length)
            else:
                # With or without the unmap flag the range must read as zeros afterwards; the
                # backend decides whether it can free the blocks while doing so.
                self.backend.write_zeroes(offset, length)
