"""Exit budgets (`--max-exits`): end a run whose guest makes more VM exits than allowed.

An exit storm (a driver polling a port, an interrupt that never stops) looks like a hang to a CI
but is the guest's doing, so it ends as its own verdict (OutcomeKind.EXIT_BUDGET, status 118)
naming the kind and the count. The counters are the C loop's per-vCPU ones
(hypervisor/vcpu/stats.py), summed over the vCPUs; Machine.wait() checks them every quarter
second, so a run may overshoot its budget by up to a quarter second's exits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hypervisor.errors import ConfigError
from hypervisor.kvm.exits import ExitReason
from hypervisor.outcome import Outcome, OutcomeKind

if TYPE_CHECKING:
    from hypervisor.kvm import Vcpu

TOTAL = "total"  # every exit KVM_RUN returned, whatever its reason
# One budget kind per KVM exit reason, by its lower-case name (api.rst, struct kvm_run exit_reason).
REASON_KINDS: dict[str, int] = {reason.name.lower(): int(reason.value) for reason in ExitReason}
KINDS = (TOTAL, *sorted(REASON_KINDS))
MAX_BUDGET = 1 << 63  # the C counters are 64-bit


def _parse_count(text: str, spec: str) -> int:
    digits = text.strip().replace("_", "")
    if not digits.isdigit():
        raise ConfigError(f"--max-exits {spec!r}: {text.strip()!r} is not a whole number of exits")
    count = int(digits)
    if not 0 < count < MAX_BUDGET:
        raise ConfigError(f"--max-exits {spec!r}: a budget must be at least 1 exit, not {count}")
    return count


@dataclass(frozen=True)
class ExitBudget:
    """Limits by kind: "total" and KVM exit reasons such as "io", "mmio", "hlt"."""

    limits: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, spec: str) -> ExitBudget:
        """`N` (a total) or `KIND=N[,KIND=N...]`; ConfigError (one line) for anything else."""
        if not spec.strip():
            raise ConfigError("--max-exits wants N or KIND=N[,KIND=N...], for example io=1000000,total=5000000")
        limits: dict[str, int] = {}
        for part in spec.split(","):
            kind, separator, value = part.partition("=")
            if not separator:
                kind, value = TOTAL, part
            kind = kind.strip().lower()
            if kind not in KINDS:
                raise ConfigError(f"--max-exits {spec!r}: unknown exit kind {kind!r} (use {', '.join(KINDS)})")
            if kind in limits:
                raise ConfigError(f"--max-exits {spec!r}: {kind} is given twice")
            limits[kind] = _parse_count(value, spec)
        return cls(tuple(limits.items()))

    def counts(self, vcpus: Iterable[Vcpu]) -> dict[str, int]:
        """The current count of every budgeted kind, summed over `vcpus` (read while they run:
        each counter is a 64-bit word only its vCPU thread writes)."""
        totals = dict.fromkeys((kind for kind, _ in self.limits), 0)
        for vcpu in vcpus:
            stats = vcpu.read_stats()  # a copy four times a second, not per exit
            for kind in totals:
                totals[kind] += stats.total_exits if kind == TOTAL else stats.exits(REASON_KINDS[kind])
        return totals

    def check(self, vcpus: Iterable[Vcpu]) -> Outcome | None:
        """An EXIT_BUDGET outcome when a count is past its limit, else None."""
        counts = self.counts(vcpus)
        return self.verdict(counts)

    def verdict(self, counts: dict[str, int]) -> Outcome | None:
        for kind, limit in self.limits:
            if counts.get(kind, 0) > limit:
                what = "VM exits" if kind == TOTAL else f"{kind} exits"
                return Outcome(
                    OutcomeKind.EXIT_BUDGET,
                    f"the guest made {counts[kind]} {what}, more than its budget of {limit} (--max-exits)",
                    data={"exit_budget": {"kind": kind, "limit": limit, "count": counts[kind],
                                          "limits": dict(self.limits), "counts": counts}},
                )  # fmt: skip
        return None
