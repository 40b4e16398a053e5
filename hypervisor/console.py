"""Console backends the machine plugs into the UART: where guest output goes, where input comes from.

Every backend implements the small `Console` protocol:

* `write(data)` receives the guest's transmitted bytes as they come, with no line buffering (a
  shell prompt without a newline must appear at once);
* `start(feed, on_quit)` begins delivering host input through `feed` (the UART's `feed`) and calls
  `on_quit` when the user asks to leave (Ctrl-A x on a terminal, as in QEMU's `-nographic`);
* `close()` stops input and restores whatever `start` changed (the terminal mode above all).

All backends derive from `ConsoleBase`, which records when the first byte arrived and lets the
machine register watchers that see the whole output stream (`add_watcher`), whatever backend is
chosen; `PhaseWatcher` is the watcher that timestamps boot phases such as "Linux version".
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import termios
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from hypervisor.errors import ConfigError
from hypervisor.process_signals import SignalCleanup

log = logging.getLogger(__name__)

Feed = Callable[[bytes], object]
OutputWatcher = Callable[[bytes], None]


@runtime_checkable
class Console(Protocol):
    def write(self, data: bytes) -> None: ...

    def start(self, feed: Feed, on_quit: Callable[[], None]) -> None: ...

    def close(self) -> None: ...


class ConsoleBase:
    """Output bookkeeping shared by every backend: first-byte time and output watchers."""

    def __init__(self) -> None:
        self._watchers: list[OutputWatcher] = []
        self.first_output_time: float | None = None  # time.monotonic() of the first guest byte
        self.bytes_written = 0

    def add_watcher(self, watcher: OutputWatcher) -> None:
        """Call `watcher(chunk)` for every chunk of guest output, on the writer's thread."""
        self._watchers.append(watcher)

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.first_output_time is None:
            self.first_output_time = time.monotonic()
        self.bytes_written += len(data)
        self._emit(data)
        for watcher in list(self._watchers):
            try:
                watcher(data)
            except Exception:  # a broken watcher must not take the vCPU thread down
                log.exception("console watcher %r failed; removing it", watcher)
                self._watchers.remove(watcher)

    def _emit(self, data: bytes) -> None:
        raise NotImplementedError

    def start(self, feed: Feed, on_quit: Callable[[], None]) -> None:
        """Backends without input have nothing to start."""

    def close(self) -> None:
        """Backends without resources have nothing to release."""

    def __enter__(self) -> ConsoleBase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PhaseWatcher:
    """Timestamps the first appearance of each pattern in the output stream.

    Output often arrives a byte at a time, so a pattern is matched across chunk boundaries by
    keeping the tail of the stream that could still start a match.
    """

    def __init__(
        self,
        patterns: Mapping[str, bytes],
        on_match: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._patterns = {name: pattern for name, pattern in patterns.items() if pattern}
        self._on_match = on_match
        self._clock = clock
        self._keep = max((len(p) for p in self._patterns.values()), default=1) - 1
        self._tail = b""
        self._lock = threading.Lock()
        self.seen: dict[str, float] = {}

    def __call__(self, data: bytes) -> None:
        matched: list[tuple[str, float]] = []
        with self._lock:
            if len(self.seen) == len(self._patterns):
                return
            window = self._tail + data
            now = self._clock()
            for name, pattern in self._patterns.items():
                if name not in self.seen and pattern in window:
                    self.seen[name] = now
                    matched.append((name, now))
            self._tail = window[-self._keep :] if self._keep else b""
        if self._on_match is not None:
            for name, when in matched:
                self._on_match(name, when)


class NullConsole(ConsoleBase):
    """Discards output (watchers still see it) and never produces input."""

    def _emit(self, data: bytes) -> None:
        pass


class MemoryConsole(ConsoleBase):
    """Captures output in memory for the API and tests; tests inject input with `feed`."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = bytearray()
        self._changed = threading.Condition()
        self._feed: Feed | None = None
        self._on_quit: Callable[[], None] | None = None
        self._early_input = bytearray()

    def _emit(self, data: bytes) -> None:
        with self._changed:
            self._buffer.extend(data)
            self._changed.notify_all()

    def data(self) -> bytes:
        with self._changed:
            return bytes(self._buffer)

    def text(self) -> str:
        return self.data().decode("utf-8", errors="replace")

    def wait_for(self, pattern: bytes, timeout: float) -> bool:
        """Block until `pattern` appears in the output or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while pattern not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def start(self, feed: Feed, on_quit: Callable[[], None]) -> None:
        with self._changed:
            self._feed, self._on_quit = feed, on_quit
            early, self._early_input = bytes(self._early_input), bytearray()
        if early:
            feed(early)

    def feed(self, data: bytes) -> None:
        """Input for the guest; held until `start` when the machine is not running yet."""
        with self._changed:
            target = self._feed
            if target is None:
                self._early_input.extend(data)
                return
        target(data)

    def quit(self) -> None:
        """What Ctrl-A x does on a terminal: ask the machine to stop."""
        if self._on_quit is not None:
            self._on_quit()

    def close(self) -> None:
        with self._changed:
            self._feed = None


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


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (pipes and terminals may take part of a buffer)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# QEMU's character-device multiplexer escape (chardev/char-mux.c): Ctrl-A, then a command key.
ESCAPE_KEY = 0x01  # Ctrl-A
QUIT_KEYS = frozenset(b"xX")
HELP_KEYS = frozenset(b"h?")
ESCAPE_HELP = (
    b"\r\nC-a h    print this help\r\n"
    b"C-a x    exit pyhv\r\n"
    b"C-a C-a  send C-a to the guest\r\n"
)
# Signals after which the terminal must not stay raw. SIGINT and SIGTSTP cannot come from the
# terminal (ISIG is off) and the vCPU kick signal belongs to the C fast path (DESIGN.md).
RESTORING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
READ_CHUNK = 4096


def raw_terminal_attributes(attributes: list[Any]) -> list[Any]:
    """The terminal mode QEMU's stdio chardev uses (chardev/char-stdio.c qemu_chr_set_echo_stdio):
    no line editing, echo, signals or input translation; output post-processing stays on so the
    host terminal still turns the guest's newlines into line feeds as usual."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, chars = attributes
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
               | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    oflag |= termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN | termios.ISIG)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    chars = list(chars)
    chars[termios.VMIN] = 1
    chars[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, chars]


class StdioConsole(ConsoleBase):
    """Guest output to stdout, host stdin to the guest.

    On a terminal, stdin is put in raw mode (restored by `close`, by an atexit hook, and on
    SIGTERM/SIGHUP through hypervisor.process_signals.SignalCleanup) and Ctrl-A works as QEMU's
    escape key: Ctrl-A x quits, Ctrl-A Ctrl-A sends a Ctrl-A, Ctrl-A h prints help on stderr.
    From a pipe, bytes are forwarded as they are and the end of input only stops reading: the
    guest keeps running.
    """

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2,
                 handle_signals: bool = True) -> None:
        super().__init__()
        # Raw descriptors, not sys.stdin & co: output must bypass Python's buffering, and
        # sys.stdin may be replaced (pytest, embedding) while fd 0 is still the terminal.
        self._stdin, self._stdout, self._stderr = stdin_fd, stdout_fd, stderr_fd
        self._handle_signals = handle_signals
        self._saved_attributes: list[Any] | None = None
        self._signal_cleanup = SignalCleanup(self._restore_terminal, RESTORING_SIGNALS)
        self._output_broken = False
        self._thread: threading.Thread | None = None
        self._wake_read, self._wake_write = -1, -1
        self._stopping = threading.Event()
        self._escape_pending = False
        self._feed: Feed | None = None
        self._on_quit: Callable[[], None] | None = None

    @property
    def is_terminal(self) -> bool:
        return os.isatty(self._stdin)

    def _emit(self, data: bytes) -> None:
        if self._output_broken:
            return
        try:
            write_all(self._stdout, data)
        except OSError as error:  # a closed pipe on stdout must not stop the guest
            self._output_broken = True
            log.warning("console output stopped: %s", error)

    def start(self, feed: Feed, on_quit: Callable[[], None]) -> None:
        if self._thread is not None:
            raise RuntimeError("StdioConsole started twice")
        self._feed, self._on_quit = feed, on_quit
        if self.is_terminal:
            self._enter_raw_mode()
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._input_loop, name="console-input", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        if self._wake_write >= 0:
            os.write(self._wake_write, b"\0")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read, self._wake_write = -1, -1
        self._restore_terminal()

    # ------------------------------------------------------------- terminal mode

    def _enter_raw_mode(self) -> None:
        self._saved_attributes = termios.tcgetattr(self._stdin)
        atexit.register(self._restore_terminal)
        if self._handle_signals:
            self._signal_cleanup.install()
        termios.tcsetattr(self._stdin, termios.TCSADRAIN, raw_terminal_attributes(self._saved_attributes))

    def _restore_terminal(self) -> None:
        """Put the terminal back as it was; idempotent, and safe from a signal handler."""
        saved, self._saved_attributes = self._saved_attributes, None
        if saved is not None:
            try:
                termios.tcsetattr(self._stdin, termios.TCSADRAIN, saved)
            except termios.error as error:  # the terminal went away (hang-up): nothing to restore
                log.debug("could not restore the terminal: %s", error)
        atexit.unregister(self._restore_terminal)
        self._signal_cleanup.uninstall()

    # ------------------------------------------------------------- input

    def _input_loop(self) -> None:
        terminal = self.is_terminal
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([self._stdin, self._wake_read], [], [])
                if self._wake_read in ready:
                    return
                chunk = os.read(self._stdin, READ_CHUNK)
            except OSError as error:  # EIO after a terminal hang-up, EBADF after close
                log.debug("console input stopped: %s", error)
                return
            if not chunk:
                log.debug("console input reached end of file; the guest keeps running")
                return
            if terminal:
                self._handle_terminal_input(chunk)
            elif self._feed is not None:
                self._feed(chunk)

    def _handle_terminal_input(self, chunk: bytes) -> None:
        if not self._escape_pending and ESCAPE_KEY not in chunk:
            if self._feed is not None:
                self._feed(chunk)
            return
        pending = bytearray()
        for key in chunk:
            if not self._escape_pending:
                if key == ESCAPE_KEY:
                    self._escape_pending = True
                else:
                    pending.append(key)
                continue
            self._escape_pending = False
            if key == ESCAPE_KEY:
                pending.append(ESCAPE_KEY)
            elif key in QUIT_KEYS:
                self._flush_input(pending)
                log.info("Ctrl-A x: quitting at the user's request")
                if self._on_quit is not None:
                    self._on_quit()
                return
            elif key in HELP_KEYS:
                self._flush_input(pending)
                self._print_help()
            else:
                log.debug("console: unknown escape Ctrl-A %#04x ignored", key)
        self._flush_input(pending)

    def _flush_input(self, pending: bytearray) -> None:
        if pending and self._feed is not None:
            self._feed(bytes(pending))
        pending.clear()

    def _print_help(self) -> None:
        try:
            write_all(self._stderr, ESCAPE_HELP)
        except OSError as error:
            log.debug("could not print the escape help: %s", error)
