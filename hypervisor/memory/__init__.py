"""Guest physical memory: anonymous mmap regions addressed by guest physical address."""

from hypervisor.memory.guest_memory import GuestMemory, MemoryRegion

__all__ = ["GuestMemory", "MemoryRegion"]
