"""virtio 1.2: split virtqueues, the MMIO transport and the block device."""
