"""Drop into pdb inside the hypervisor process at a matching VM exit.

    from hypervisor.debug.pdb_break import pdb_action
    machine.break_on("io", port=0x3f8, is_write=True, action=pdb_action)

At a hit, pdb starts on the vCPU's thread with `event` (the typed exit event), `ctx` (the
ExitContext: ctx.regs(), ctx.set_regs(rax=...), ctx.read_physical(...), ctx.read_virtual(...),
ctx.set_read_data(...), ctx.device) and `machine` in scope. The guest vCPU waits, outside KVM_RUN,
for as long as pdb runs; the other vCPUs go on. Leaving pdb with `continue` lets the breakpoint
stop the machine as usual; setting `resume = True` in pdb first lets the guest go on at once
(the action then returns False: hypervisor.vcpu.breakpoints, "Action").

pdb reads the hypervisor's own standard input, so use it from `pyhv debug` or a script run in a
terminal, not from a process whose stdin is a pipe. With no terminal the hook logs a warning and
stops the machine instead of hanging in a pdb nobody can answer.
"""

from __future__ import annotations

import logging
import pdb
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hypervisor.vcpu.context import ExitContext
    from hypervisor.vcpu.events import ExitEvent

log = logging.getLogger(__name__)

BANNER = (
    "pyhv: pdb at a VM exit: `event`, `ctx` and `machine` are in scope "
    "(ctx.regs(), ctx.set_regs(rax=1), ctx.read_physical(addr, n), ctx.set_read_data(b'..')); "
    "`c` leaves pdb and stops the machine, `resume = True` then `c` lets the guest go on"
)


def _inspect(event: ExitEvent, ctx: ExitContext, machine: Any, debugger: pdb.Pdb) -> bool:
    """The frame pdb shows: its locals are what the user gets to look at and change."""
    resume = False
    debugger.set_trace()  # the next line is where pdb stops, with event, ctx and machine in scope
    return resume


def pdb_action(event: ExitEvent, ctx: ExitContext) -> bool | None:
    """A breakpoint action (`break_on(..., action=pdb_action)`): pdb at the exit.

    Returns False (the guest goes on) when the user set `resume = True` in pdb, None otherwise
    (the breakpoint then stops the machine)."""
    from hypervisor.vcpu.events import describe_event

    if not sys.stdin.isatty():
        log.warning("pdb breakpoint hit at %s, but stdin is not a terminal: stopping instead", describe_event(event))
        return None
    debugger = pdb.Pdb(skip=["hypervisor.vcpu.*"])
    debugger.message(f"{BANNER}\npyhv: exit: {describe_event(event)}")
    return False if _inspect(event, ctx, ctx.machine, debugger) else None
