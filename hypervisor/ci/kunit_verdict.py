"""One verdict for a KUnit run, from its KTAP results and how the run ended (docs/exit-status.md).

The order matters, so that a CI is never told a kernel passed when it did not, nor that it
failed when the runner did: a run that ended for an infrastructure reason (a timeout, a
hypervisor error, an instruction the host cannot emulate) before every planned result arrived
is that infrastructure status, as `pyhv run` would give it; otherwise the kernel's results
decide: no KTAP at all, a crash, failures, a missing plan, no tests, or a pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypervisor.ci.ktap import KtapResult, Status, walk_leaves
from hypervisor.outcome import EXIT_STATUS, Outcome, OutcomeClass, OutcomeKind

PASSED = 0
FAILED = 100  # at least one test failed
CRASHED = 101  # a test never got its result: the kernel crashed, reset or stopped mid-test
MISSING_PLAN = 102  # no top-level `1..N`: nothing shows that every test ran
NO_KTAP = 103  # no `KTAP version` line on the console: not a KUnit kernel, or KUnit disabled
NO_TESTS = 104  # a plan of `1..0`: --filter matched no suite
NAMES_SHOWN = 5  # failing tests named in the one-line detail


@dataclass(frozen=True)
class KunitVerdict:
    name: str  # "passed", "failed", "crashed", "missing-plan", "no-ktap", "no-tests", or the run's outcome
    exit_status: int
    detail: str
    outcome_class: OutcomeClass

    def describe(self) -> str:
        return f"{self.name}: {self.detail}" if self.detail else self.name


def _names(result: KtapResult, status: Status) -> list[str]:
    return [".".join(path) for test in result.tests for path, leaf in walk_leaves(test) if leaf.status is status]


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def kunit_verdict(result: KtapResult, outcome: Outcome) -> KunitVerdict:
    verdict = OutcomeClass.VERDICT
    ended = f"the run ended with {outcome.describe()}"
    if not result.complete and outcome.outcome_class is OutcomeClass.INFRASTRUCTURE:
        # A quit has status 0 in `pyhv run`; here it must not read as a pass.
        status = outcome.exit_status or EXIT_STATUS[OutcomeKind.INTERRUPTED]
        done = f" after {result.counts.total} results" if result.found else " before any KTAP"
        return KunitVerdict(outcome.kind.value, status, f"{ended}{done}: the tests did not finish",
                            OutcomeClass.INFRASTRUCTURE)  # fmt: skip
    if not result.found:
        return KunitVerdict("no-ktap", NO_KTAP, f"no KTAP on the console (a kernel without CONFIG_KUNIT?); {ended}",
                            verdict)  # fmt: skip
    crashed = _names(result, Status.CRASHED)
    if crashed:
        evidence = f" ({result.crash})" if result.crash else ""
        return KunitVerdict("crashed", CRASHED, f"{_listed(crashed)} got no result{evidence}; {ended}", verdict)
    failed = _names(result, Status.FAILED)
    if failed or result.counts.failed:
        names = _listed(failed) if failed else _listed([t.name for t in result.tests if t.status is Status.FAILED])
        return KunitVerdict("failed", FAILED, f"{result.counts.failed} of {result.counts.total} failed: {names}",
                            verdict)  # fmt: skip
    if result.missing_plan:
        return KunitVerdict("missing-plan", MISSING_PLAN,
                            f"no top-level test plan (1..N) after {result.counts.total} results: nothing shows that "
                            "every test ran", verdict)  # fmt: skip
    if result.counts.total == 0:
        return KunitVerdict("no-tests", NO_TESTS, "the plan was 1..0: no suite ran (does --filter match?)", verdict)
    return KunitVerdict("passed", PASSED, "", verdict)
