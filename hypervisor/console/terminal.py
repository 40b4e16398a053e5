"""`StdioConsole`: guest output on stdout, host stdin to the guest, a terminal made raw.

On a terminal it behaves as QEMU's stdio chardev with its multiplexer: raw mode, and Ctrl-A as
the escape key (chardev/char-mux.c). The terminal must never stay raw after pyhv, so three
safety nets put it back: `close`, an atexit hook, and SIGTERM/SIGHUP (through
hypervisor.process_signals.SignalCleanup).
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import termios
import threading
from collections.abc import Callable
from typing import Any

from hypervisor.console.file import write_all
from hypervisor.console.protocol import ConsoleBase, Feed
from hypervisor.process_signals import SignalCleanup

log = logging.getLogger(__name__)

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
    SIGTERM/SIGHUP) and Ctrl-A works as QEMU's escape key: Ctrl-A x quits, Ctrl-A Ctrl-A sends a
    Ctrl-A, Ctrl-A h prints help on stderr. From a pipe, bytes are forwarded as they are and the
    end of input only stops reading: the guest keeps running.
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
        """QEMU's Ctrl-A escape; an escape split across reads carries over to the next chunk."""
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
