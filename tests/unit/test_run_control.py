"""RunControl without KVM: pause holds, acknowledgements and stops (fake vCPUs)."""

from __future__ import annotations

import threading

from hypervisor.outcome import Outcome, OutcomeKind
from hypervisor.vcpu.control import RunControl, Stop


class FakeVcpu:
    def __init__(self, vcpu_id: int) -> None:
        self.id = vcpu_id
        self.kicks = 0

    def kick(self) -> None:
        self.kicks += 1

    def clear_kick(self) -> None:
        pass


def test_an_internal_pause_never_releases_a_users() -> None:
    control = RunControl()
    control.pause(wait=False, owner="internal:halt-probe")
    control.pause(wait=False)  # a debugger stops the machine meanwhile
    control.resume("internal:halt-probe")
    assert control.paused
    control.resume()
    assert not control.paused


def test_a_plain_resume_keeps_internal_holds() -> None:
    control = RunControl()
    control.pause(wait=False, owner="internal:probe")
    control.pause(wait=False)
    control.resume()
    assert control.paused
    control.resume("internal:probe")
    assert not control.paused


def test_pause_waits_for_every_live_vcpu_to_park() -> None:
    control = RunControl()
    vcpus = [FakeVcpu(0), FakeVcpu(1)]
    for vcpu in vcpus:
        control.attach(vcpu)
        control.thread_started(vcpu.id)
    control.pause(wait=False)
    assert all(vcpu.kicks == 1 for vcpu in vcpus)
    assert not control.wait_parked(timeout=0.05)  # nobody acknowledged yet
    parked = [threading.Thread(target=control.park, args=(vcpu,)) for vcpu in vcpus]
    for thread in parked:
        thread.start()
    assert control.wait_parked(timeout=5)
    control.resume()
    for thread in parked:
        thread.join(5)
        assert not thread.is_alive()


def test_a_finished_vcpu_counts_as_acknowledged() -> None:
    control = RunControl()
    vcpu = FakeVcpu(0)
    control.attach(vcpu)
    control.thread_started(0)
    control.pause(wait=False)
    control.thread_finished(0)
    assert control.wait_parked(timeout=1)


def test_stops_are_queued_and_the_first_outcome_wins() -> None:
    control = RunControl()
    control.attach(FakeVcpu(0))
    control.post_stop(Stop("breakpoint", 0))
    assert control.paused
    control.request_stop(Outcome(OutcomeKind.TIMEOUT))
    control.request_stop(Outcome(OutcomeKind.RESET))
    assert control.outcome is not None and control.outcome.kind is OutcomeKind.TIMEOUT
    assert [stop.reason for stop in control.pending_stops()] == ["breakpoint", "finished"]
