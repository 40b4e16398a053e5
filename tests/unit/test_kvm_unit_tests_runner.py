"""The kvm-unit-tests runner's pure parts: unittests.cfg, QEMU options, result classification."""

import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from hypervisor.conformance.junit import junit_xml
from hypervisor.conformance.qemu_params import PyhvPlan, plan_for
from hypervisor.conformance.runner import (
    Engine,
    Status,
    TestResult,
    classify,
    pyhv_command,
    run_test,
    static_skip,
)
from hypervisor.conformance.unittests_cfg import TestConfig, parse_timeout, parse_unittests_cfg
from hypervisor.errors import ConfigError

CFG = '''
# a comment
[x2apic]
file = apic.flat
smp = 2
qemu_params = -cpu qemu64,+x2apic,+tsc-deadline
arch = x86_64
timeout = 30
groups = apic

[vmexit_ple_round_robin]
file = vmexit.flat
test_args = 'ple_round_robin'
groups = vmexit nodefault

[old_style]
file = old.flat
extra_params = -append "a b" -m 256
timeout = 2m

[multi]
file = multi.flat
qemu_params = """-cpu max \\
   -m 64"""
check = /sys/module/kvm/parameters/x=Y
'''


def test_parse_keys_defaults_and_multiline_values() -> None:
    tests = {test.name: test for test in parse_unittests_cfg(CFG)}
    assert list(tests) == ["x2apic", "vmexit_ple_round_robin", "old_style", "multi"]
    apic = tests["x2apic"]
    assert (apic.file, apic.smp, apic.arch, apic.timeout, apic.groups) == ("apic.flat", 2, "x86_64", 30.0, ("apic",))
    assert tests["vmexit_ple_round_robin"].test_args == "ple_round_robin"
    assert tests["vmexit_ple_round_robin"].timeout == 90.0  # upstream's default
    assert tests["old_style"].timeout == 120.0
    assert tests["multi"].params == "-cpu max -m 64"
    assert tests["multi"].check == ("/sys/module/kvm/parameters/x=Y",)


@pytest.mark.parametrize("text", ["file = a.flat\n", "[a]\nsmp = 2\n", "[a]\nfile = a\nsmp = two\n",
                                  "[a]\nfile=a\n[a]\nfile=b\n", "[a]\nfile = a\nnot a pair\n",
                                  '[a]\nfile = a\nqemu_params = """-m 1\n', "[a]\nfile = a\nsmp = 0\n",
                                  "[a]\nfile = a\ntimeout = soon\n"])  # fmt: skip
def test_malformed_configurations_are_one_line_errors(text: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_unittests_cfg(text)
    assert "\n" not in str(error.value)


def test_timeouts() -> None:
    assert parse_timeout("90s", "t") == 90 and parse_timeout("1.5h", "t") == 5400 and parse_timeout("7", "t") == 7


def test_qemu_options_become_a_pyhv_plan() -> None:
    plan = plan_for('-append "a b" -m 2g -cpu max,+vmx -smp 3', 1, "x")
    assert (plan.cpus, plan.memory_mib, plan.test_args, plan.unsupported) == (3, 2048, "x a b", None)
    assert any("-cpu" in note for note in plan.notes)
    assert "hyperv-testdev" in (plan_for("-cpu host -device hyperv-testdev", 1, "").unsupported or "")
    assert plan_for("", 1, "10000000 `date +%s`", now=1234.5).test_args == "10000000 1234"
    assert "shell command" in (plan_for("", 1, "`rm -rf /`").unsupported or "")
    assert plan_for("-m lots", 1, "").unsupported
    assert plan_for("-machine pit=off", 2, "").notes == ["-machine pit=off not applied"]


def test_static_skips_follow_run_tests_sh(tmp_path: Path) -> None:
    (tmp_path / "a.flat").write_bytes(b"")
    base = TestConfig("t", "a.flat")
    assert static_skip(base, tmp_path, Engine.PYHV) is None
    assert static_skip(TestConfig("t", "a.flat", arch="i386"), tmp_path, Engine.PYHV) == "i386 only"
    assert "manual" in (static_skip(TestConfig("t", "a.flat", groups=("nodefault",)), tmp_path, Engine.PYHV) or "")
    assert static_skip(TestConfig("t", "a.flat", groups=("nodefault",)), tmp_path, Engine.PYHV, True) is None
    assert "kvm only" in (static_skip(TestConfig("t", "a.flat", accel="kvm"), tmp_path, Engine.QEMU_TCG) or "")
    assert static_skip(TestConfig("t", "a.flat", accel="kvm"), tmp_path, Engine.PYHV) is None
    check = (f"{tmp_path / 'missing'}=Y",)
    assert "not equal to Y" in (static_skip(TestConfig("t", "a.flat", check=check), tmp_path, Engine.PYHV) or "")
    assert "not found" in (static_skip(TestConfig("t", "b.flat"), tmp_path, Engine.PYHV) or "")


CONSOLE = "PASS: one\nFAIL: two things\nSKIP: three\nSUMMARY: 3 tests, 1 unexpected failures, 1 skipped\n"


@pytest.mark.parametrize("status,expected,fragment", [
    (1, Status.PASS, "3 tests"),
    (77, Status.SKIP, "three"),
    (3, Status.FAIL, "first: two things"),
    (124, Status.TIMEOUT, "within 9 s"),
    (None, Status.TIMEOUT, "within 9 s"),
])  # fmt: skip
def test_classify_by_the_qemu_status_rule(status: int | None, expected: Status, fragment: str) -> None:
    result, reason = classify(Engine.PYHV, status, CONSOLE, "", 9)
    assert result is expected and fragment in reason


def test_classify_names_the_pyhv_outcome() -> None:
    stderr = "\npyhv: emulation-failure: KVM could not emulate 0f 01 fd at rip 0x401000 (exit status 122)\n"
    result, reason = classify(Engine.PYHV, 122, "PASS: a\n", stderr, 9)
    assert result is Status.FAIL and "0f 01 fd" in reason
    result, reason = classify(Engine.QEMU_TCG, 0, "", "", 9)
    assert result is Status.FAIL and "no isa-debug-exit" in reason


def test_a_skip_without_skip_lines_gives_the_last_message() -> None:
    console = "enabling apic\nWARNING: vmx not supported, add '-cpu host'\nSUMMARY: 0 tests\n"
    assert classify(Engine.PYHV, 77, console, "", 9) == (Status.SKIP, "vmx not supported, add '-cpu host'")


def test_classify_names_an_unhandled_exception_and_abort() -> None:
    console = "PASS: a\nUnhandled exception 13 #GP(1e4) at ip 0000000000400264\nerror_code=01e4\n"
    result, reason = classify(Engine.PYHV, 127, console, "pyhv: debug-exit 127 (exit status 127)\n", 9)
    assert result is Status.FAIL
    assert reason == "Unhandled exception 13 #GP(1e4) at ip 0000000000400264; the test called abort()"


def test_classify_names_a_failed_assert() -> None:
    console = "x86/apic.c:942: assert failed: is_apic_hw_enabled(): APIC should be enabled.\n\tSTACK: 401fb1\n"
    result, reason = classify(Engine.QEMU_TCG, 127, console, "", 9)
    assert result is Status.FAIL and reason.startswith("x86/apic.c:942: assert failed")


def test_pyhv_command_uses_the_qemu_test_machine(tmp_path: Path) -> None:
    plan = PyhvPlan(cpus=2, memory_mib=128, test_args="x y")
    command = pyhv_command(TestConfig("t", "a.flat", timeout=5), tmp_path, tmp_path / "t.log", plan)
    assert command[:4] == [sys.executable, "-m", "hypervisor", "run"]
    assert command[command.index("--machine") + 1] == "qemu-test"
    assert command[command.index("--append") + 1] == "x y"
    assert command[command.index("--timeout") + 1] == "5"
    assert "--device" not in command


def test_qemu_devices_pyhv_has_become_its_device_options(tmp_path: Path) -> None:
    params = "-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu"
    plan = plan_for(params, 4, "")
    assert plan.unsupported is None and plan.devices == ["intel-iommu", "edu"]
    assert any("intremap=on,eim=off" in note for note in plan.notes)
    command = pyhv_command(TestConfig("t", "a.flat"), tmp_path, tmp_path / "t.log", plan)
    assert [command[i + 1] for i, word in enumerate(command) if word == "--device"] == ["intel-iommu", "edu"]
    assert "pci-testdev" in (plan_for("-device pci-testdev", 1, "").unsupported or "")


def test_a_skipped_test_runs_nothing_and_junit_reports_it(tmp_path: Path) -> None:
    result = run_test(TestConfig("t", "absent.flat"), tmp_path, Engine.PYHV, tmp_path)
    assert result.status is Status.SKIP and "not found" in result.reason
    log = tmp_path / "f.log"
    log.write_text("FAIL: x\x01\n")
    results = [
        result,
        TestResult("f", Engine.PYHV, Status.FAIL, "bad", 1.5, 3, log),
        TestResult("p", Engine.QEMU_TCG, Status.PASS),
        TestResult("h", Engine.PYHV, Status.TIMEOUT, "slow"),
    ]
    suite = ElementTree.fromstring(junit_xml(results, "kvm-unit-tests"))
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped"), suite.get("errors")) == (
        "4",
        "1",
        "1",
        "1",
    )
    assert "FAIL: x" in (suite.find("testcase[@name='f']/system-out").text or "")  # type: ignore[union-attr]
