"""SIGTERM and Ctrl-C as the CLI handles them: one KeyboardInterrupt, and a clean exit status after it."""

from __future__ import annotations


def raise_keyboard_interrupt(signum: int, frame: object) -> None:
    """A SIGTERM handler: the command ends as for Ctrl-C (status 130, temporary files removed)."""
    raise KeyboardInterrupt


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
