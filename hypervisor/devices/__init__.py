"""Emulated devices and the buses they sit on; no device knows about KVM."""

# The PCI devices a machine can have (`pyhv run --device`, Machine(pci_devices=...)), named as
# QEMU names them so kvm-unit-tests' `-device` options map one to one. Here, not in pci.py, so
# the CLI can offer them without importing any device code at start-up.
PCI_DEVICE_TYPES = ("edu", "intel-iommu")
