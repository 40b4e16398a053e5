"""RunControl: how the main thread, a debugger and the vCPU threads agree on running, pausing and stopping.

The contract (after Firecracker's vCPU state machine, where a vCPU answers a Pause request only
once it is out of KVM_RUN):

* `request_stop(outcome)`: the first outcome wins; every vCPU is kicked out of KVM_RUN and leaves.
* `pause(wait=True)`: every vCPU is kicked and *parks* outside KVM_RUN; the call returns only when
  each live vCPU thread has acknowledged (or finished), so registers and memory read afterwards are
  consistent. `resume()` lets them all go on.
* `step(vcpu_id)`: while paused, one vCPU runs to its next real exit, handles it and parks again.
* Stops (a breakpoint, a debug trap, a hook's request, the end of the run) are queued for whoever
  drives the machine (`wait_for_stop`).

The vCPU threads read `pause_requested` and `stop_requested` without the lock on their hot path;
every change to either also kicks the vCPUs, and the kick is sticky (the C loop returns KICKED at
its next entry), so a vCPU can never miss it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypervisor.outcome import Outcome

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu
    from hypervisor.vcpu.breakpoints import Breakpoint
    from hypervisor.vcpu.events import ExitEvent

log = logging.getLogger(__name__)

STOP_REASONS = ("breakpoint", "debug", "hook", "budget", "finished")


@dataclass(frozen=True)
class Stop:
    """Why the machine stopped: the vCPU, the exit that caused it and the breakpoint, if any."""

    reason: str  # one of STOP_REASONS
    vcpu: int | None = None
    event: ExitEvent | None = None
    breakpoint: Breakpoint | None = None

    def describe(self) -> str:
        from hypervisor.vcpu.events import describe_event

        text = self.reason
        if self.breakpoint is not None:
            text += f" {self.breakpoint.id}"
        if self.event is not None:
            text += f": {describe_event(self.event)}"
        return text


class RunControl:
    """The first outcome requested wins; requesting one kicks every vCPU out of KVM_RUN."""

    def __init__(self) -> None:
        self._lock = threading.Condition(threading.Lock())
        self._vcpus: list[Vcpu] = []
        self._outcome: Outcome | None = None
        self.finished = threading.Event()
        # Read by vCPU threads without the lock (a stale read is corrected by the sticky kick).
        self.pause_requested = False
        # Who holds the pause: "user" (pause()), "stop" (a breakpoint, trap or hook) or an
        # internal prober; the machine runs again only when nobody holds it. An internal pause
        # (the final-halt probe) is released by its owner alone, so it can never resume a
        # machine a debugger paused meanwhile.
        self._holds: set[str] = set()
        self._live: set[int] = set()  # vCPU ids whose threads are running their loop
        self._parked: set[int] = set()  # vCPU ids waiting in park()
        self._step_vcpu: int | None = None  # may run one exit while the machine is paused
        self._step_result: list[ExitEvent | None] = []
        self._step_done = threading.Event()
        self._stops: queue.Queue[Stop] = queue.Queue()
        self.last_step_stop: Stop | None = None  # a breakpoint or trap met by the last step

    def attach(self, vcpu: Vcpu) -> None:
        with self._lock:
            self._vcpus.append(vcpu)

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    @property
    def stop_requested(self) -> bool:
        return self._outcome is not None

    def _kick_all(self) -> None:
        with self._lock:
            vcpus = list(self._vcpus)
        for vcpu in vcpus:
            vcpu.kick()

    def request_stop(self, outcome: Outcome) -> None:
        """Ends the run with `outcome` unless another outcome came first. Any thread."""
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = outcome
            self._lock.notify_all()
        log.debug("stop requested: %s", outcome.describe())
        self.finished.set()
        self._step_done.set()
        self._stops.put(Stop("finished"))
        self._kick_all()

    def reset(self) -> None:
        """Forgets the outcome so the same vCPUs can run again (benchmarks, tests)."""
        with self._lock:
            self._outcome = None
            self.finished.clear()
            self.pause_requested = False
            self._holds.clear()
            self._step_vcpu = None

    # -- the vCPU side ------------------------------------------------------------------------

    def thread_started(self, vcpu_id: int) -> None:
        """Counts a vCPU thread as live (the machine does it before the thread starts, so that
        a pause right after start() waits for it; the thread does it again, idempotently)."""
        with self._lock:
            self._live.add(vcpu_id)

    def thread_finished(self, vcpu_id: int) -> None:
        with self._lock:
            self._live.discard(vcpu_id)
            self._parked.discard(vcpu_id)
            if self._step_vcpu == vcpu_id:
                self._finish_step(None)
            self._lock.notify_all()

    def park(self, vcpu: Vcpu) -> bool:
        """Called by a vCPU thread outside KVM_RUN while a pause is requested: acknowledges the
        pause and blocks until resumed, stepped or stopped. Returns True when it may run on (a
        step returns True too: `stepping(vcpu_id)` tells the runner to park after one exit)."""
        vcpu_id = vcpu.id
        with self._lock:
            self._parked.add(vcpu_id)
            self._lock.notify_all()
            while self.pause_requested and self._outcome is None and self._step_vcpu != vcpu_id:
                self._lock.wait()
            self._parked.discard(vcpu_id)
            # The kicks that brought it here are spent: it is outside KVM_RUN. Cleared under
            # the lock, so a pause requested after this point kicks it again (sticky).
            vcpu.clear_kick()
            self._lock.notify_all()
            return self._outcome is None

    def stepping(self, vcpu_id: int) -> bool:
        return self._step_vcpu == vcpu_id

    def step_finished(self, vcpu_id: int, event: ExitEvent | None) -> None:
        """The stepped vCPU handled its exit (`event`; None when it was only kicked)."""
        with self._lock:
            if self._step_vcpu == vcpu_id:
                self._finish_step(event)

    def _finish_step(self, event: ExitEvent | None) -> None:
        self._step_vcpu = None
        self._step_result.append(event)
        self._step_done.set()

    def post_stop(self, stop: Stop) -> None:
        """A vCPU stopped the machine (breakpoint, debug trap, hook): pause everyone, queue it.
        A stop met by the vCPU being stepped answers the step instead (`last_step_stop`): the
        stepping caller is the one waiting for it."""
        with self._lock:
            self._holds.add("stop")
            self.pause_requested = True
            if self._step_vcpu is not None and self._step_vcpu == stop.vcpu:
                self.last_step_stop = stop
                self._finish_step(stop.event)
                stop = None  # type: ignore[assignment]
        if stop is not None:
            self._stops.put(stop)
        self._kick_all()

    # -- the driver's side: pause, resume, step, stops ----------------------------------------------

    def pause(self, wait: bool = True, timeout: float | None = None, owner: str = "user") -> bool:
        """Parks every vCPU outside KVM_RUN. With `wait`, returns True once every live vCPU
        thread has acknowledged (or the run is over); False if `timeout` passed first."""
        with self._lock:
            self._holds.add(owner)
            self.pause_requested = True
        self._kick_all()
        if not wait:
            return True
        return self.wait_parked(timeout)

    def wait_parked(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._live <= self._parked:
                if self._outcome is not None and not self._live:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True

    def resume(self, owner: str | None = None) -> None:
        """Releases `owner`'s pause, or with no owner every pause but internal probes'."""
        with self._lock:
            if owner is None:
                self._holds &= {hold for hold in self._holds if hold.startswith("internal:")}
            else:
                self._holds.discard(owner)
            self.pause_requested = bool(self._holds)
            self._lock.notify_all()

    @property
    def paused(self) -> bool:
        return self.pause_requested

    def all_parked(self) -> bool:
        with self._lock:
            return self._live <= self._parked

    def step(self, vcpu: Vcpu, timeout: float | None = None) -> ExitEvent | None:
        """While paused, lets `vcpu` run to its next real exit; returns that exit's event, or None
        if the run ended, the vCPU is gone or `timeout` passed (the vCPU is then kicked back)."""
        vcpu_id = vcpu.id
        with self._lock:
            if not self.pause_requested:
                raise RuntimeError("step_exit needs a paused machine (call pause() first)")
            if vcpu_id not in self._live or self._outcome is not None:
                return None
            self._step_result.clear()
            self._step_done.clear()
            self.last_step_stop = None
            self._step_vcpu = vcpu_id
            self._lock.notify_all()
        if not self._step_done.wait(timeout):
            vcpu.kick()  # no exit in time: bring it back to its park
            self._step_done.wait(5.0)
        self.wait_parked(5.0)
        with self._lock:
            self._step_vcpu = None
            return self._step_result[0] if self._step_result else None

    def wait_for_stop(self, timeout: float | None = None) -> Stop | None:
        try:
            return self._stops.get(timeout=timeout)
        except queue.Empty:
            return None

    def pending_stops(self) -> list[Stop]:
        stops = []
        while True:
            try:
                stops.append(self._stops.get_nowait())
            except queue.Empty:
                return stops
