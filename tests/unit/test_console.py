"""Console backends: memory capture, files, output bookkeeping, and the terminal console on a real pty.

Watching the output stream is Machine.output_watchers' job (tests/kvm/test_guests.py), and boot
phases are tests/unit/test_phase_watcher.py's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path

import pytest

from hypervisor.console import (
    Console,
    ConsoleBase,
    FileConsole,
    MemoryConsole,
    NullConsole,
    StdioConsole,
)
from hypervisor.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


class Sink:
    """Collects what a console feeds to the guest, and quit requests."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.quits = 0
        self.changed = threading.Condition()

    def feed(self, data: bytes) -> None:
        with self.changed:
            self.data.extend(data)
            self.changed.notify_all()

    def quit(self) -> None:
        with self.changed:
            self.quits += 1
            self.changed.notify_all()

    def wait(self, predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
        with self.changed:
            return self.changed.wait_for(predicate, timeout)


def test_backends_satisfy_the_protocol(tmp_path: Path) -> None:
    file_console = FileConsole(tmp_path / "out")
    for console in (MemoryConsole(), NullConsole(), file_console, StdioConsole()):
        assert isinstance(console, Console)
    file_console.close()


def test_memory_console_captures_and_feeds() -> None:
    console = MemoryConsole()
    sink = Sink()
    console.feed(b"early ")  # before start: held, then delivered in order
    console.start(sink.feed, sink.quit)
    console.feed(b"late")
    assert bytes(sink.data) == b"early late"
    console.write(b"Linux version 6.1\r\n")
    console.write("é".encode())
    assert console.data() == b"Linux version 6.1\r\n\xc3\xa9"
    assert console.text().endswith("é")
    console.quit()
    assert sink.quits == 1


def test_memory_console_wait_for_across_threads() -> None:
    console = MemoryConsole()
    timer = threading.Timer(0.05, console.write, args=(b"login: ",))
    timer.start()
    assert console.wait_for(b"login:", timeout=5)
    assert not console.wait_for(b"never", timeout=0.01)
    timer.join()


def test_first_output_time_and_byte_count() -> None:
    console = NullConsole()
    assert console.first_output_time is None
    before = time.monotonic()
    console.write(b"")  # nothing came: no first byte yet
    assert console.first_output_time is None
    console.write(b"a")
    first = console.first_output_time
    console.write(b"bc")
    assert first is not None and first >= before
    assert console.first_output_time == first  # the first byte's time, not the latest
    assert console.bytes_written == 3


def test_every_backend_keeps_the_bookkeeping(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    backends = [MemoryConsole(), NullConsole(), FileConsole(tmp_path / "out"),
                StdioConsole(stdin_fd=read_end, stdout_fd=write_end, handle_signals=False)]  # fmt: skip
    try:
        for console in backends:
            console.write(b"hello")
            assert console.bytes_written == 5 and console.first_output_time is not None, console
    finally:
        for console in backends:
            console.close()
        os.close(read_end)
        os.close(write_end)


def test_console_package_names_its_modules() -> None:
    """The public names stay importable from hypervisor.console, each defined in its own module."""
    import hypervisor.console as package

    classes = [name for name in package.__all__ if name != "Feed"]  # Feed is a type alias
    assert {name: getattr(package, name).__module__ for name in classes} == {
        "Console": "hypervisor.console.protocol",
        "ConsoleBase": "hypervisor.console.protocol",
        "FileConsole": "hypervisor.console.file",
        "MemoryConsole": "hypervisor.console.memory",
        "NullConsole": "hypervisor.console.memory",
        "StdioConsole": "hypervisor.console.terminal",
    }
    assert not hasattr(ConsoleBase(), "add_watcher")  # one output-watcher API: Machine.output_watchers


def test_file_console_appends(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"old\n")
    console = FileConsole(path)
    console.write(b"new")
    assert path.read_bytes() == b"old\nnew"  # unbuffered: visible before close
    console.close()


def test_file_console_bad_path_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open console file"):
        FileConsole(tmp_path / "missing-dir" / "log")


def test_stdio_output_is_unbuffered_to_fd() -> None:
    read_end, write_end = os.pipe()
    try:
        console = StdioConsole(stdin_fd=read_end, stdout_fd=write_end, handle_signals=False)
        console.write(b"# ")  # a prompt without newline
        assert os.read(read_end, 16) == b"# "
    finally:
        os.close(read_end)
        os.close(write_end)


def test_stdio_pipe_input_forwarded_and_eof_does_not_quit() -> None:
    read_end, write_end = os.pipe()
    out_read, out_write = os.pipe()
    sink = Sink()
    console = StdioConsole(stdin_fd=read_end, stdout_fd=out_write, handle_signals=False)
    try:
        console.start(sink.feed, sink.quit)
        os.write(write_end, b"echo hi; exit\n\x01x")  # no escape handling on a pipe
        os.close(write_end)
        assert sink.wait(lambda: len(sink.data) == 16)
        assert bytes(sink.data) == b"echo hi; exit\n\x01x"
        time.sleep(0.05)
        assert sink.quits == 0
    finally:
        console.close()
        for fd in (read_end, out_read, out_write):
            os.close(fd)


@pytest.fixture
def pty_pair():  # type: ignore[no-untyped-def]
    master, slave = os.openpty()
    yield master, slave
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


def test_stdio_terminal_raw_mode_escape_and_restore(pty_pair) -> None:  # type: ignore[no-untyped-def]
    master, slave = pty_pair
    original = termios.tcgetattr(slave)
    assert original[3] & termios.ICANON and original[3] & termios.ECHO
    help_read, help_write = os.pipe()
    sink = Sink()
    console = StdioConsole(stdin_fd=slave, stdout_fd=slave, stderr_fd=help_write, handle_signals=False)
    try:
        console.start(sink.feed, sink.quit)
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert not raw[0] & termios.ICRNL
        os.write(master, b"ls\r\x01\x01\x01h")
        assert sink.wait(lambda: sink.data == bytearray(b"ls\r\x01"))
        assert os.read(help_read, 4096).count(b"C-a x") == 1
        os.write(master, b"ab\x01")  # an escape split across reads
        assert sink.wait(lambda: sink.data.endswith(b"ab"))
        os.write(master, b"x")
        assert sink.wait(lambda: sink.quits == 1)
        assert bytes(sink.data) == b"ls\r\x01ab"
    finally:
        console.close()
        os.close(help_read)
        os.close(help_write)
    assert termios.tcgetattr(slave) == original


def test_stdio_terminal_restored_on_sigterm(pty_pair) -> None:  # type: ignore[no-untyped-def]
    """A process killed by SIGTERM while the console is raw leaves the terminal as it found it."""
    master, slave = pty_pair
    original = termios.tcgetattr(slave)
    script = textwrap.dedent(
        """
        import sys, time
        from hypervisor.console import StdioConsole
        console = StdioConsole()
        console.start(lambda data: None, lambda: None)
        print("raw", flush=True)
        time.sleep(30)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    child = subprocess.Popen([sys.executable, "-c", script], stdin=slave, stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"raw\n"
        assert not termios.tcgetattr(slave)[3] & termios.ICANON
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert termios.tcgetattr(slave) == original


def test_stdio_terminal_restored_at_exit(pty_pair) -> None:  # type: ignore[no-untyped-def]
    """A program that forgets close() still gets its terminal back (atexit)."""
    master, slave = pty_pair
    original = termios.tcgetattr(slave)
    script = (
        "from hypervisor.console import StdioConsole\n"
        "StdioConsole().start(lambda data: None, lambda: None)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", script], stdin=slave, env=env, timeout=30)
    assert result.returncode == 0
    assert termios.tcgetattr(slave) == original
