"""Output to files and descriptors: `FileConsole`, and `write_all` for any fd."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from hypervisor.console.protocol import ConsoleBase
from hypervisor.errors import ConfigError

log = logging.getLogger(__name__)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (pipes and terminals may take part of a buffer)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FileConsole(ConsoleBase):
    """Appends output to a file (no input). The file is opened at construction to fail early."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        try:
            self._file = open(self.path, "ab", buffering=0)
        except OSError as error:
            raise ConfigError(f"cannot open console file {self.path}: {error.strerror}") from error
        self._failed = False
        self._lock = threading.Lock()

    def _emit(self, data: bytes) -> None:
        with self._lock:
            if self._failed or self._file.closed:
                return
            try:
                self._file.write(data)
            except OSError as error:
                # A full disk must not stop the guest; say so once and drop the rest.
                self._failed = True
                log.warning("console file %s: %s; further guest output is dropped", self.path, error)

    def close(self) -> None:
        with self._lock:
            self._file.close()
