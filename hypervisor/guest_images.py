"""Where the bundled default guest (kernel and initramfs from guest_images/) is found."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypervisor.errors import ConfigError

DEFAULT_KERNEL = "vmlinux.xz"
DEFAULT_INITRD = "initramfs.cpio.xz"
ENVIRONMENT_VARIABLE = "PYHV_GUEST_IMAGES"


def candidate_folders() -> list[Path]:
    """$PYHV_GUEST_IMAGES, the source tree's guest_images/ (editable installs and checkouts),
    and the data folder a wheel installs (sys.prefix/share/pyhv/guest_images)."""
    folders = []
    if os.environ.get(ENVIRONMENT_VARIABLE):
        folders.append(Path(os.environ[ENVIRONMENT_VARIABLE]))
    folders.append(Path(__file__).resolve().parent.parent / "guest_images")
    folders.append(Path(sys.prefix) / "share" / "pyhv" / "guest_images")
    return folders


def default_guest() -> tuple[Path, Path]:
    """The default kernel and initramfs; ConfigError naming where it looked when absent."""
    for folder in candidate_folders():
        kernel, initrd = folder / DEFAULT_KERNEL, folder / DEFAULT_INITRD
        if kernel.is_file() and initrd.is_file():
            return kernel, initrd
    looked = ", ".join(str(f) for f in candidate_folders())
    raise ConfigError(
        f"the default guest ({DEFAULT_KERNEL}, {DEFAULT_INITRD}) is not installed; looked in {looked}. "
        "Pass --kernel, or set PYHV_GUEST_IMAGES"
    )
