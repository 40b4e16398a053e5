"""The --fault grammar (hypervisor/faults.py) and the plan that decides which request to spoil."""

from __future__ import annotations

import pytest

from hypervisor.errors import ConfigError
from hypervisor.faults import FaultPlan, FaultRule, parse_fault_spec


def test_the_example_of_the_docs() -> None:
    rule = parse_fault_spec("vda:write:3:eio,after=EXT4-fs (vda): mounted, ok")
    assert (rule.disk, rule.operation, rule.nth, rule.action) == ("vda", "write", 3, "eio")
    assert rule.after == b"EXT4-fs (vda): mounted, ok"  # commas and colons stay in the pattern
    assert not rule.every_later and rule.describe() == "vda:write:3:eio,after=EXT4-fs (vda): mounted, ok"


def test_options() -> None:
    rule = parse_fault_spec("vdb:read:2+:short,bytes=1024,exits=500,time=1.5")
    assert rule.every_later and rule.short_bytes == 1024 and rule.exits == 500 and rule.at_seconds == 1.5
    assert parse_fault_spec("vda:flush:1:drop").action == "drop"
    assert parse_fault_spec("vda:discard:1:slow,delay=0.25").delay == 0.25


@pytest.mark.parametrize(
    "spec,message",
    [
        ("vda:write:eio", "expected DISK:OP:K"),
        ("sda:write:1:eio", "the disk is vda"),
        ("vda:append:1:eio", "the operation is one of"),
        ("vda:write:1:explode", "the action is one of"),
        ("vda:write:0:eio", "counts from 1"),
        ("vda:write:-1:eio", "whole number"),
        ("vda:write:x:eio", "whole number"),
        ("vda:write:1:short", "short applies to read"),
        ("vda:read:1:drop", "drop applies to flush or write"),
        ("vda:write:1:slow,delay=3", "delay must be between"),
        ("vda:write:1:slow,delay=nan", "finite number"),
        ("vda:write:1:slow,delay=soon", "wants a number"),
        ("vda:read:1:short,bytes=100", "whole number of 512-byte sectors"),
        ("vda:write:1:eio,exits=-3", "must not be negative"),
        ("vda:write:1:eio,time=-1", "time="),
        ("vda:write:1:eio,after=", "after= needs a pattern"),
        ("vda:write:1:eio,colour=red", "unknown option"),
        ("vda:write:1:eio,exits=1,exits=2", "given twice"),
        ("vda:write:1:eio,", "missing after the last comma"),
    ],
)
def test_bad_rules_are_one_line_config_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_fault_spec(spec)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_the_kth_request_after_the_console_pattern() -> None:
    plan = FaultPlan([parse_fault_spec("vda:write:2:eio,after=mounted")])
    assert plan.decide("vda", "write", 0, 1) is None  # not armed: not counted
    plan.console(b"EXT4 moun")
    plan.console(b"ted\n")  # matched across chunks
    assert plan.decide("vdb", "write", 0, 1) is None  # another disk
    assert plan.decide("vda", "read", 0, 1) is None  # another operation
    assert plan.decide("vda", "write", 8, 1) is None  # the 1st after the pattern
    assert plan.decide("vda", "write", 9, 2) is not None  # the 2nd
    assert plan.decide("vda", "write", 10, 1) is None  # only the 2nd
    report = plan.to_dict()
    assert report["injected"] == [{"rule": "vda:write:2:eio,after=mounted", "disk": "vda", "operation": "write",
                                   "action": "eio", "sector": 9, "sectors": 2,
                                   "at_seconds": report["injected"][0]["at_seconds"]}]  # type: ignore[index]  # fmt: skip
    assert report["rules"][0]["matching_requests"] == 3 and report["rules"][0]["injected"] == 1  # type: ignore[index]


def test_exit_and_time_triggers() -> None:
    exits = [0]
    plan = FaultPlan([FaultRule("vda", "read", nth=1, exits=100, every_later=True)])
    plan.arm(lambda: exits[0])
    assert plan.decide("vda", "read", 0, 1) is None
    exits[0] = 100
    assert plan.decide("vda", "read", 0, 1) is not None
    assert plan.decide("vda", "read", 0, 1) is not None  # every later one too
    later = FaultPlan([FaultRule("vda", "read", at_seconds=3600)])
    later.arm(lambda: 0)
    assert later.decide("vda", "read", 0, 1) is None


def test_python_rules_are_checked_like_parsed_ones() -> None:
    with pytest.raises(ConfigError, match="the disk is vda"):
        FaultRule("hda", "write")


def test_the_record_list_is_bounded() -> None:
    plan = FaultPlan([FaultRule("vda", "write", every_later=True)], max_records=3)
    for sector in range(10):
        assert plan.decide("vda", "write", sector, 1) is not None
    report = plan.to_dict()
    assert len(report["injected"]) == 3 and report["injected_not_listed"] == 7  # type: ignore[arg-type]


def test_a_pattern_that_is_not_utf8_is_matched_as_typed() -> None:
    # The shell hands Python undecodable bytes as surrogates; they must not become a traceback.
    rule = parse_fault_spec("vda:write:1:eio,after=\udcff\udcfeok")
    assert rule.after == b"\xff\xfeok"
    plan = FaultPlan([rule])
    plan.console(b"\xff\xfeok")
    assert plan.decide("vda", "write", 0, 1) is rule
