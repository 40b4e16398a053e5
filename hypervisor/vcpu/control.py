"""RunControl: how the main thread and the vCPU threads agree that a run is over (or paused)."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from hypervisor.outcome import Outcome

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu

log = logging.getLogger(__name__)


class RunControl:
    """The first outcome requested wins; requesting one kicks every vCPU out of KVM_RUN."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vcpus: list[Vcpu] = []
        self._outcome: Outcome | None = None
        self.finished = threading.Event()
        self._resume = threading.Event()
        self._resume.set()

    def attach(self, vcpu: Vcpu) -> None:
        with self._lock:
            self._vcpus.append(vcpu)

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    @property
    def stop_requested(self) -> bool:
        return self._outcome is not None

    def request_stop(self, outcome: Outcome) -> None:
        """Ends the run with `outcome` unless another outcome came first. Any thread."""
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = outcome
            vcpus = list(self._vcpus)
        log.debug("stop requested: %s", outcome.describe())
        self.finished.set()
        self._resume.set()
        for vcpu in vcpus:
            vcpu.kick()

    def reset(self) -> None:
        """Forgets the outcome so the same vCPUs can run again (benchmarks, the debugger)."""
        with self._lock:
            self._outcome = None
            self.finished.clear()

    # -- pausing, for the debugger and the API --------------------------------------------

    def pause(self) -> None:
        with self._lock:
            self._resume.clear()
            vcpus = list(self._vcpus)
        for vcpu in vcpus:
            vcpu.kick()

    def resume(self) -> None:
        self._resume.set()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    def wait_while_paused(self) -> None:
        self._resume.wait()
