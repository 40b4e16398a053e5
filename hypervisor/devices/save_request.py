"""The save-request port: a guest asks its hypervisor to snapshot it by writing any byte here.

pyhv's own port, next to the debug-exit port (0x501): present only when a run was told where to
save (`pyhv run --save PATH --save-on-request`, docs/snapshots.md). A guest that reaches the
point worth saving -- a test harness at its prompt, a fuzzer's forkserver before its first
input -- writes one byte; the vCPUs stop just after that OUT and the machine is saved. Reads
return 0xff, as an unmapped port does.
"""

from __future__ import annotations

from collections.abc import Callable

SAVE_REQUEST_PORT = 0x50A
SAVE_REQUEST_PORT_SIZE = 1


class SaveRequestPort:
    def __init__(self, on_request: Callable[[], None]) -> None:
        self._on_request = on_request
        self.requests = 0

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data: bytes) -> None:
        self.requests += 1
        self._on_request()
