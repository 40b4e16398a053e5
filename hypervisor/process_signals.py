"""The process's signal handling, in one place.

pyhv is a CLI process with one main thread and many workers (vCPUs, disk I/O, console input).
Python runs signal handlers on the main thread only, so the rules are:

* during a run, SIGTERM ends the command as Ctrl-C does: `sigterm_raises` turns it into
  KeyboardInterrupt (or a command's own exception), so a run stops with status 130 and its
  temporary files removed instead of dying mid-write;
* worker threads block SIGINT, SIGTERM and SIGHUP (`block_terminal_signals`), so the kernel
  delivers them to the main thread, which turns them into an outcome; a vCPU thread then only
  ever sees the C fast path's kick signal (DESIGN.md);
* state that must not outlive the process in a changed form (a raw terminal) is put back by
  `SignalCleanup` when a fatal signal arrives, before the signal goes on as it would have;
* `forget_caught_interrupts` keeps the exit status pyhv chose after an interrupt it handled.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

# The signals a user or a supervisor (systemd, CI runners, a closing terminal) ends pyhv with.
TERMINAL_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

Handler = Callable[[int, FrameType | None], Any] | int | None


@contextmanager
def sigterm_raises(exception: type[BaseException] = KeyboardInterrupt) -> Iterator[None]:
    """While the block runs, SIGTERM raises `exception` in the main thread.

    The default makes SIGTERM end a command exactly as Ctrl-C does (status 130, temporary files
    removed); a command that must tell the two apart (`pyhv debug`: Ctrl-C at its prompt only
    interrupts a command) passes its own exception. The previous handler is back afterwards.
    Like `signal.signal`, this must be called on the main thread.
    """

    def raise_exception(signum: int, frame: FrameType | None) -> NoReturn:
        raise exception

    previous = signal.signal(signal.SIGTERM, raise_exception)
    try:
        yield
    finally:
        # None: the previous handler was installed outside Python and cannot be put back from
        # here; the default action is the closest thing to it.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def block_terminal_signals() -> None:
    """Called first in a worker thread: SIGINT, SIGTERM and SIGHUP go to the main thread.

    The kernel delivers a process-wide signal to any thread that does not block it. Landing in a
    vCPU thread it would interrupt KVM_RUN for nothing and reach the main thread's handler only
    when the main thread next wakes up; blocked here, it wakes the main thread at once.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)


class SignalCleanup:
    """Runs `cleanup` when one of `signals` arrives, then lets the signal go on as it would have.

    "Go on" means: to the handler installed before `install`, or nothing if the signal was
    ignored, or the process dies of the signal (the default action, so a parent sees the true
    cause of death). A signal whose handler was installed outside Python (C code: `getsignal`
    says None) is left alone, since that handler could not be put back.
    Handlers can only be changed on the main thread: elsewhere `install` and `uninstall` do
    nothing, and the caller's other safety nets (close, atexit) remain.
    """

    def __init__(self, cleanup: Callable[[], None], signals: Iterable[int]) -> None:
        self._cleanup = cleanup
        self._signals = tuple(signals)
        self._previous: dict[int, Handler] = {}

    def install(self) -> None:
        if not _on_main_thread():
            return
        for signum in self._signals:
            if signum not in self._previous and signal.getsignal(signum) is not None:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        """Puts the previous handlers back; idempotent."""
        if not _on_main_thread():
            return  # kept: _on_signal still chains correctly, a later call restores
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._cleanup()
        self.uninstall()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            # Die of the same signal, as the default action would have done.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def forget_caught_interrupts() -> None:
    """Undo CPython's "ended by Ctrl-C" mark for a KeyboardInterrupt that pyhv handled.

    CPython marks the process as ended by an unhandled KeyboardInterrupt whenever one leaves code
    run by exec() of a string, even when a caller catches it (Python/pythonrun.c,
    run_eval_code_obj). Dataclasses and namedtuples are built that way, so a SIGTERM or Ctrl-C
    that lands while a module defining them is being imported sets the mark, and under
    `python -m hypervisor` the process then kills itself with SIGINT after pyhv chose its exit
    status. Evaluating any string clears the mark (CPython 3.10 to 3.13). An interrupt that really
    goes unhandled is marked anew by runpy's caller, so it still ends the process with SIGINT.
    """
    exec("pass")  # a constant string, run for the side effect above


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
