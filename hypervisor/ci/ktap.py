"""A KTAP parser: test results from a kernel console (Documentation/dev-tools/ktap.rst, KTAP v1).

KTAP is built from version lines (`KTAP version 1`, also `TAP version 13/14`), plans (`1..N`),
result lines (`ok|not ok N description # DIRECTIVE diagnostic`) and diagnostic lines (`# ...`);
a nested test's lines are indented (two spaces a level in the spec, four in Linux 6.1's KUnit)
and open with their own version line, and with KUnit a `# Subtest: NAME` header. Anything else
is an "unknown line" (ktap.rst §Unknown lines): kernel messages interleaved with the tests,
kept in the log of the test that was running and never a result.

The console is untrusted and may stop anywhere: the parser never raises on its input. A kernel
that crashes mid-test leaves tests without their result line; they are reported as crashed (as
kunit.py does), a planned result that never came as a crashed placeholder, and anything odd
(a wrong number, a name that does not match its header, a second plan) as a parse error. It is
pure: lines in, a `KtapResult` out; `KtapParser` also takes a stream line by line.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

# printk's prefixes: an optional log level `<6>`, the time `[    0.123456]` and, with
# CONFIG_PRINTK_CALLER, the caller `[    T1]`.
PRINTK_PREFIX = re.compile(r"^(?:<\d{1,2}>)?(?:\[\s*\d+\.\d+\](?:\[\s*[TC]\d+\])?\s?)?")
VERSION = re.compile(r"(K?TAP) version (\d+)\s*$")
PLAN = re.compile(r"^1\.\.(\d+)\s*(?:#.*)?$")
RESULT = re.compile(r"^(ok|not ok)\s+(\d+)(?:\s+(.*))?$")
SUBTEST_HEADER = re.compile(r"^# Subtest: (.*)$")
# Lines after which no more test output can come (kunit.py's kunit_parser.py KTAP_END, plus any
# panic): the parser stops there and anything still open is a crash.
END_OF_OUTPUT = re.compile(r"Kernel panic - not syncing|List of all partitions:|reboot: System halted")
# The first line of a kernel crash report, kept as the evidence for a crashed test.
CRASH_EVIDENCE = re.compile(
    r"Kernel panic - not syncing|BUG: |Oops: |general protection fault|kernel BUG at|Unable to handle kernel"
)
DIRECTIVES = ("SKIP", "TODO", "XFAIL", "TIMEOUT", "ERROR")
MAX_LOG_LINES = 500  # per test: a chatty kernel must not grow a report without bound
MAX_LINE_CHARS = 4096
MAX_DEPTH = 16  # KUnit nests three levels; a deeper console is hostile or garbled, not a test plan
TAB_WIDTH = 8


class Status(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CRASHED = "crashed"  # its result never came: the output ended (crash, reset, timeout) during it
    NO_TESTS = "no-tests"


@dataclass
class Counts:
    """Leaf tests by status, and the parse errors met (kunit.py's TestCounts)."""

    passed: int = 0
    failed: int = 0
    crashed: int = 0
    skipped: int = 0
    errors: int = 0

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.crashed + self.skipped

    def add(self, other: Counts) -> None:
        self.passed += other.passed
        self.failed += other.failed
        self.crashed += other.crashed
        self.skipped += other.skipped
        self.errors += other.errors

    def add_status(self, status: Status) -> None:
        if status is Status.PASSED:
            self.passed += 1
        elif status is Status.FAILED:
            self.failed += 1
        elif status is Status.SKIPPED:
            self.skipped += 1
        elif status is Status.CRASHED:
            self.crashed += 1

    def describe(self) -> str:
        """kunit.py's wording: `Ran 12 tests: passed: 10, failed: 1, skipped: 1` (zeros left out)."""
        parts = [(name, getattr(self, name)) for name in ("passed", "failed", "crashed", "skipped", "errors")]
        shown = ", ".join(f"{name}: {count}" for name, count in parts if count)
        return f"Ran {self.total} tests" + (f": {shown}" if shown else "")

    def status(self) -> Status:
        if self.crashed:
            return Status.CRASHED
        if self.failed:
            return Status.FAILED
        if self.passed:
            return Status.PASSED
        return Status.SKIPPED if self.skipped else Status.NO_TESTS


@dataclass
class KtapTest:
    name: str
    number: int
    status: Status
    directive: str | None = None  # SKIP, TODO, XFAIL, TIMEOUT, ERROR (ktap.rst §Test case result lines)
    reason: str = ""  # the diagnostic data after `#` on its result line
    log: list[str] = field(default_factory=list)  # diagnostics and kernel lines printed while it ran
    subtests: list[KtapTest] = field(default_factory=list)
    plan: int | None = None  # its subtests' plan, when it has one
    errors: list[str] = field(default_factory=list)
    line: int = 0  # console line of its result; 0 when it never came
    counts: Counts = field(default_factory=Counts)

    @property
    def ok(self) -> bool:
        return self.status in (Status.PASSED, Status.SKIPPED)


@dataclass
class KtapResult:
    found: bool  # a version line was seen
    version: str = ""
    plan: int | None = None
    tests: list[KtapTest] = field(default_factory=list)  # the top level: KUnit's suites
    log: list[str] = field(default_factory=list)  # top-level diagnostics (`# Totals: ...`)
    errors: list[str] = field(default_factory=list)  # top-level parse errors
    complete: bool = False  # every planned top-level result arrived
    crash: str | None = None  # the first crash report line seen while tests ran
    counts: Counts = field(default_factory=Counts)

    @property
    def status(self) -> Status:
        return self.counts.status() if self.found else Status.NO_TESTS

    @property
    def missing_plan(self) -> bool:
        return self.found and self.plan is None

    def all_errors(self) -> list[str]:
        """Every parse error, the top level's first, each prefixed with its test's path."""
        found = list(self.errors)

        def walk(test: KtapTest, path: str) -> None:
            name = f"{path}.{test.name}" if path else test.name
            found.extend(f"{name}: {error}" for error in test.errors)
            for subtest in test.subtests:
                walk(subtest, name)

        for test in self.tests:
            walk(test, "")
        return found


@dataclass
class _Level:
    """An open KTAP document: the top level, or the subtests of a test whose result is pending."""

    indent: int
    name: str = ""  # from `# Subtest: NAME`
    plan: int | None = None
    tests: list[KtapTest] = field(default_factory=list)
    log: list[str] = field(default_factory=list)  # lines for the next result at this level
    preamble: list[str] = field(default_factory=list)  # lines before the document began
    errors: list[str] = field(default_factory=list)

    @property
    def begun(self) -> bool:
        return self.plan is not None or bool(self.tests) or bool(self.name)


def _append_log(log: list[str], line: str) -> None:
    if len(log) < MAX_LOG_LINES:
        log.append(line)
    elif len(log) == MAX_LOG_LINES:
        log.append("[pyhv: further lines left out]")


def _split_description(text: str) -> tuple[str, str | None, str]:
    """(description, directive, diagnostic) of what follows a result's number: a description
    cannot contain `#`, so the first `#` starts the directive and diagnostic data."""
    text = text.strip()
    if text.startswith("- "):  # TAP's optional dash; KUnit before 6.2 prints it
        text = text[2:]
    description, hash_sign, rest = text.partition("#")
    description, rest = description.strip(), rest.strip()
    if not hash_sign:
        return description, None, ""
    word = rest.split(maxsplit=1)[0] if rest else ""
    for directive in DIRECTIVES:
        # TAP compares directives without case and lets SKIP be a prefix ("# Skipped: ...").
        if word.upper().startswith(directive):
            return description, directive, rest[len(word) :].lstrip(" :").strip()
    return description, None, rest


def _result_status(ok: bool, directive: str | None) -> Status:
    if directive == "SKIP":
        return Status.SKIPPED  # ok or not ok: ktap.rst allows both with SKIP
    if not ok and directive == "ERROR":
        return Status.CRASHED  # the test could not run to its end: kunit_json.py's "ERROR" status
    if not ok and directive in ("TODO", "XFAIL"):
        # An expected failure fails nothing (TAP's TODO); counted with the skips, neither passed nor failed.
        return Status.SKIPPED
    return Status.PASSED if ok else Status.FAILED


class KtapParser:
    """Feed console lines with `feed_line` (or text with `feed`), then call `finish`."""

    def __init__(self) -> None:
        self._stack: list[_Level] = []
        self._prefix = ""
        self._line_number = 0
        self._done = False
        self._partial = ""
        self.result = KtapResult(found=False)

    @property
    def complete(self) -> bool:
        """True once every planned top-level result has arrived."""
        return self.result.complete

    def feed(self, data: str) -> None:
        """Console text in any chunks; lines are parsed as their newline arrives."""
        text = self._partial + data
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.feed_line(line)
        if len(self._partial) > MAX_LINE_CHARS:  # a line without end: parsed in pieces, memory bounded
            self.feed_line(self._partial)
            self._partial = ""

    def feed_line(self, raw: str) -> None:
        self._line_number += 1
        if self._done:
            return
        line = raw.replace("\r", "").rstrip()[:MAX_LINE_CHARS]
        line = PRINTK_PREFIX.sub("", line, count=1)
        if not self._stack:
            self._look_for_version(line)
            return
        if self._prefix and line.startswith(self._prefix):
            line = line[len(self._prefix) :]
        self._parse(line)

    def finish(self) -> KtapResult:
        """The result: still-open tests become crashed, missing planned results placeholders."""
        if self._partial:
            # A line the output stopped in the middle of: kept as text, never read as a result.
            if self._stack and not self._done:
                cut = PRINTK_PREFIX.sub("", self._partial.replace("\r", ""), count=1)
                _append_log(self._stack[-1].log, cut.strip()[:MAX_LINE_CHARS])
            self._partial = ""
        if not self._stack:
            return self.result
        while len(self._stack) > 1:
            self._close_without_result("the output ended before its result line")
        root = self._stack[0]
        result = self.result
        result.plan, result.tests, result.errors = root.plan, root.tests, root.errors
        result.log.extend(root.preamble + root.log)
        if root.plan is None:
            result.errors.append("no test plan (1..N) at the top level: the run cannot show that every test ran")
        else:
            _add_missing(root.tests, root.plan, root.errors, "suite")
            if len(root.tests) > root.plan:
                result.errors.append(f"{len(root.tests)} results for a plan of {root.plan}")
        result.complete = root.plan is not None and not any(t.line == 0 for t in root.tests)
        result.counts = Counts(errors=len(result.errors))
        for test in root.tests:
            result.counts.add(test.counts)
        self._done = True
        self._stack = []
        return result

    # -- the line kinds ---------------------------------------------------------------------

    def _look_for_version(self, line: str) -> None:
        match = VERSION.search(line)
        if match is None:
            return
        prefix = line[: match.start()]
        if prefix.strip():
            return  # words before it: a version line quoted inside some other message
        # kunit.py's rule: the indentation of the first version line prefixes every KTAP line.
        self._prefix = prefix
        self.result.found = True
        self.result.version = match.group(0).strip()
        self._stack.append(_Level(indent=0))

    def _parse(self, line: str) -> None:
        body = line.lstrip(" \t")
        indent = len(line[: len(line) - len(body)].expandtabs(TAB_WIDTH))
        top = self._stack[-1]
        if indent > top.indent and len(self._stack) >= MAX_DEPTH and not body.startswith("#"):
            if not any("nested deeper than" in error for error in self._stack[0].errors):
                self._stack[0].errors.append(f"line {self._line_number}: nested deeper than {MAX_DEPTH} levels")
            _append_log(top.log, body)
            return
        if VERSION.match(body):
            self._on_version(indent, body)
        elif (plan := PLAN.match(body)) is not None:
            self._on_plan(indent, int(plan.group(1)), body)
        elif (result := RESULT.match(body)) is not None:
            self._on_result(indent, result.group(1) == "ok", int(result.group(2)), result.group(3) or "")
        elif (header := SUBTEST_HEADER.match(body)) is not None and indent > self._stack[0].indent:
            self._on_subtest_header(indent, header.group(1).strip())
        else:
            if CRASH_EVIDENCE.search(body) and self.result.crash is None and not self.result.complete:
                self.result.crash = body
            # Kept indented relative to its level, so an expectation's detail lines line up.
            expanded = line.expandtabs(TAB_WIDTH)
            relative = expanded[top.indent :] if expanded.startswith(" " * top.indent) else body
            _append_log(top.log, relative)
            if END_OF_OUTPUT.search(body):
                self._done = True  # nothing after this is test output; finish() closes what is open

    def _on_version(self, indent: int, body: str) -> None:
        root = self._stack[0]
        if indent <= root.indent:
            if root.begun:
                _append_log(root.log, body)
                root.errors.append(f"line {self._line_number}: a second KTAP document began; the rest was ignored")
                self._done = True
            return
        self._close_orphans_deeper_than(indent)
        top = self._stack[-1]
        if top.indent == indent:
            if top.plan is None and not top.tests:
                return  # the version line of a level a `# Subtest:` header opened
            self._close_without_result("a new test began before its result line")
        self._open(indent)

    def _on_subtest_header(self, indent: int, name: str) -> None:
        self._close_orphans_deeper_than(indent)
        top = self._stack[-1]
        if top.indent == indent and len(self._stack) > 1:
            if not top.name and not top.tests:
                top.name = name
                return
            self._close_without_result("a new test began before its result line")
        self._open(indent).name = name

    def _on_plan(self, indent: int, count: int, body: str) -> None:
        self._close_orphans_deeper_than(indent)
        top = self._stack[-1]
        if indent > top.indent:
            top = self._open(indent)
        if top.plan is None and not top.tests:
            top.plan = count
        else:
            top.errors.append(f"line {self._line_number}: a second plan {body!r}")

    def _on_result(self, indent: int, ok: bool, number: int, text: str) -> None:
        root = self._stack[0]
        if indent < root.indent:
            _append_log(self._stack[-1].log, text)
            return
        nested = self._close_deeper_than(indent)
        top = self._stack[-1]
        if indent > top.indent:  # a nested result with no version line or plan before it
            top = self._open(indent)
        description, directive, reason = _split_description(text)
        test = KtapTest(description, number, _result_status(ok, directive), directive, reason, line=self._line_number)
        expected = len(top.tests) + 1
        if number != expected:
            test.errors.append(f"numbered {number}, expected {expected}")
        test.log = top.log
        top.log = []
        if nested is not None:
            _adopt(test, nested)
        _settle(test)
        top.tests.append(test)
        if top is root and root.plan is not None and len(root.tests) >= root.plan:
            self.result.complete = True
            self._done = True  # the document is whole: later console lines are the boot going on

    # -- levels -------------------------------------------------------------------------------

    def _open(self, indent: int) -> _Level:
        parent = self._stack[-1]
        level = _Level(indent=indent, preamble=parent.log)
        parent.log = []
        self._stack.append(level)
        return level

    def _close_deeper_than(self, indent: int) -> _Level | None:
        """Pops the levels indented deeper than `indent`; returns the one directly below it (the
        subtests of the result about to come). Deeper ones never got a result: crashed."""
        nested = None
        while len(self._stack) > 1 and self._stack[-1].indent > indent:
            level = self._stack.pop()
            if nested is not None:
                level.tests.append(_crashed_from(nested, len(level.tests) + 1, "no result line for this test"))
            nested = level
        return nested

    def _close_orphans_deeper_than(self, indent: int) -> None:
        """Before a line that is not a result: levels deeper than it will get no result line."""
        nested = self._close_deeper_than(indent)
        if nested is not None:
            top = self._stack[-1]
            top.tests.append(_crashed_from(nested, len(top.tests) + 1, "no result line for this test"))

    def _close_without_result(self, why: str) -> None:
        level = self._stack.pop()
        parent = self._stack[-1]
        parent.tests.append(_crashed_from(level, len(parent.tests) + 1, why))


def _crashed_from(level: _Level, number: int, why: str) -> KtapTest:
    test = KtapTest(level.name or f"test {number}", number, Status.CRASHED, errors=[why])
    pending, level.log = level.log, []
    _adopt(test, level)
    # KUnit announces no test before it runs: the first planned test without a result is the one
    # that was running, and what the kernel printed since the last result (an oops) is its log.
    running = next((sub for sub in test.subtests if sub.line == 0 and not sub.subtests), None)
    if running is not None:
        running.log, running.errors = pending, ["the output ended while it ran"]
    else:
        test.log.extend(pending)
    _settle(test)
    test.status = Status.CRASHED
    return test


def _adopt(test: KtapTest, level: _Level) -> None:
    """Gives `test` the subtests of the level that ran under it, checked against its plan."""
    test.subtests, test.plan = level.tests, level.plan
    test.log = level.preamble + level.log + test.log
    test.errors = level.errors + test.errors
    if level.name and level.name != test.name and test.line:
        test.errors.append(f"result line names {test.name!r}, its header {level.name!r}")
    if level.plan is not None:
        _add_missing(test.subtests, level.plan, test.errors, "test")
        if len(test.subtests) > level.plan:
            test.errors.append(f"{len(test.subtests)} results for a plan of {level.plan}")


def _add_missing(tests: list[KtapTest], plan: int, errors: list[str], what: str) -> None:
    missing = range(len(tests) + 1, plan + 1)
    for number in missing:
        placeholder = KtapTest(f"{what} {number}", number, Status.CRASHED, errors=["planned, but no result came"])
        _settle(placeholder)
        tests.append(placeholder)
    if missing:
        errors.append(f"{len(missing)} of {plan} planned results missing")


def _settle(test: KtapTest) -> None:
    """Counts from the leaves up (kunit.py's bubble_up_test_results), with the checks that keep
    the verdict honest: a crash below crashes the parent, and a parent whose own line disagrees
    with its subtests is counted as a failure of its own."""
    counts = Counts(errors=len(test.errors))
    for subtest in test.subtests:
        counts.add(subtest.counts)
    if not test.subtests:
        counts.add_status(test.status)
    elif counts.crashed:
        test.status = Status.CRASHED
    elif test.status is Status.PASSED and counts.failed:
        test.errors.append(f"says ok, but {counts.failed} of its tests failed")
        counts.errors += 1
        test.status = Status.FAILED
    elif test.status is Status.FAILED and not counts.failed:
        counts.failed += 1  # it failed by itself (a suite init, an exit check): show it in the counts
    test.counts = counts


def parse_ktap(lines: Iterable[str]) -> KtapResult:
    """The KTAP results in console `lines` (kernel messages around and among them are fine)."""
    parser = KtapParser()
    for line in lines:
        parser.feed_line(line)
    return parser.finish()


def parse_ktap_text(text: str) -> KtapResult:
    """The KTAP results in console text; a last line without its newline was cut off."""
    parser = KtapParser()
    parser.feed(text)
    return parser.finish()


def walk_leaves(test: KtapTest, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], KtapTest]]:
    """(names from the top, test) of every test without subtests under and including `test`."""
    here = (*path, test.name)
    if not test.subtests:
        yield here, test
        return
    for subtest in test.subtests:
        yield from walk_leaves(subtest, here)
