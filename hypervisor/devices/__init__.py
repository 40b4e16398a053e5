"""Emulated devices and the buses they sit on; no device knows about KVM."""
