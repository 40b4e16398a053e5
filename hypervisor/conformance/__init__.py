"""Conformance: running kvm-unit-tests (upstream's x86/unittests.cfg) under pyhv and QEMU TCG.

- unittests_cfg: the configuration file's format, parsed into `TestConfig` entries;
- qemu_params: what a test's QEMU options mean for a pyhv run (memory, unsupported devices);
- runner: one test under pyhv or QEMU, its result classified like upstream's run_tests.sh;
- junit: the results as a JUnit XML report.

The CLI is hypervisor/cli/kvm_unit_tests.py; docs/conformance.md has the results on this host.
"""
