"""The ioctl wrappers' errors, without a usable /dev/kvm."""

import errno
import os

import pytest

from hypervisor.errors import KvmError, KvmUnavailableError
from hypervisor.kvm import Kvm
from hypervisor.kvm.ffi import ffi, ioctl, ioctl_value


def test_ioctl_on_a_bad_fd_names_the_ioctl_and_errno() -> None:
    with pytest.raises(KvmError) as caught:
        ioctl(9999, "KVM_GET_REGS", ffi.new("struct kvm_regs *"))
    assert caught.value.ioctl == "KVM_GET_REGS" and caught.value.errno == errno.EBADF
    assert "KVM_GET_REGS failed" in str(caught.value) and "Bad file descriptor" in str(caught.value)


def test_ioctl_on_a_file_that_is_not_kvm() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with pytest.raises(KvmError) as caught:
            ioctl_value(fd, "KVM_GET_API_VERSION")
        assert caught.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


def test_missing_device_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        Kvm(str(tmp_path / "kvm"))


def test_device_that_is_not_kvm(tmp_path) -> None:
    with pytest.raises(KvmUnavailableError, match="is not a KVM device"):
        Kvm("/dev/null")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can open any file; permission errors cannot be provoked")
def test_device_without_permission(tmp_path) -> None:
    path = tmp_path / "kvm"
    path.write_bytes(b"")
    path.chmod(0)
    with pytest.raises(KvmUnavailableError, match="permission denied"):
        Kvm(str(path))


def test_permission_error_is_explained(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(KvmUnavailableError, match="permission denied opening /dev/kvm: add your user to the 'kvm'"):
        Kvm()
