"""pyhv: a type-2 hypervisor on Linux KVM."""

__version__ = "0.1.0"
