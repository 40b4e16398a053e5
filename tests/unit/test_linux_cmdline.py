"""The Linux command line pyhv builds (hypervisor/launch.py linux_cmdline)."""

from __future__ import annotations

from hypervisor.launch import BUNDLED_GUEST_PVM_CMDLINE, DEFAULT_CMDLINE, PVM_CMDLINE, linux_cmdline


def test_hardware_virtualization_gets_the_defaults_and_the_users_words_last() -> None:
    assert linux_cmdline("quiet", pvm=False, root="/dev/vda", bundled=True) == (
        f"{DEFAULT_CMDLINE} root=/dev/vda rootwait quiet"
    )


def test_kvm_pvm_adds_its_fallback_for_every_kernel() -> None:
    assert linux_cmdline(None, pvm=True, root=None) == f"{DEFAULT_CMDLINE} {PVM_CMDLINE}"


def test_only_the_bundled_guest_on_kvm_pvm_has_the_fast_string_features_hidden() -> None:
    cmdline = linux_cmdline("clearcpuid=308", pvm=True, root=None, bundled=True)
    assert cmdline == f"{DEFAULT_CMDLINE} {PVM_CMDLINE} {BUNDLED_GUEST_PVM_CMDLINE} clearcpuid=308"
    assert BUNDLED_GUEST_PVM_CMDLINE == "clearcpuid=297,580"  # ERMS (9*32+9), FSRM (18*32+4)
    assert "clearcpuid" not in linux_cmdline(None, pvm=True, root=None, bundled=False)
