"""virtio 1.2: split virtqueues, the MMIO transport and the block device.

Modules, bottom up:
  spec        numbers shared by everything below (status bits, ring flags, feature bits)
  iovec       lists of memoryviews cut by byte position (headers, payloads, status bytes)
  queue       the device side of a split virtqueue (§2.7): chains bounded and checked
  device      what a device gives its transport (VirtioDevice)
  worker      the I/O thread per device, woken by one eventfd (ioeventfd) per queue
  mmio_registers  the virtio-mmio register layout (§4.2.2)
  mmio        the virtio-mmio transport, version 2 (§4.2.2), a bus Device of 4 KiB
  blk_request virtio-blk requests parsed from chains and run on a BlockBackend (§5.2.6)
  blk         the virtio-blk device (§5.2): features, config space, the request queue

Wiring one disk (what the machine does):
    transport = MmioTransport(VirtioBlock(open_disk(path), serial=s), memory, IrqFdLine(vm, irq))
    bus.insert(transport, base, WINDOW_SIZE)
    vm.register_ioeventfd(transport.notify_eventfd(0), base + QUEUE_NOTIFY_OFFSET, 4, datamatch=0)
    transport.start()            # the I/O thread
    ... run; after the vCPUs stopped: transport.close(), before guest memory is closed.
Linux finds it through `virtio_mmio.device=4K@<base>:<irq>` on its command line.
"""
