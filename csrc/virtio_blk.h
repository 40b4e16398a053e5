/*
 * pyhv's C fast path for virtio-blk: the common read and write request on a raw file.
 *
 * Called by the device's I/O thread (hypervisor/virtio/blk_fast.py) with the GIL released. It
 * takes chains from a split virtqueue's available ring (virtio 1.2 §2.7.6), and completes only a
 * request it can finish exactly as hypervisor/virtio/blk_request.py would: a 16-byte header
 * descriptor, data descriptors all device-writable (IN) or all device-readable (OUT), a 1-byte
 * device-writable status descriptor, direct descriptors each inside one RAM region, a payload
 * of whole sectors inside the disk, and a preadv/pwritev that moves every byte. Anything else,
 * including every error, is declined: the chain stays on the ring for the Python path, which
 * owns every other case and every error status, so request semantics live in one place.
 */
#ifndef PYHV_VIRTIO_BLK_H
#define PYHV_VIRTIO_BLK_H

#include <stdint.h>

/* PYHV_CFFI_BEGIN */
#define PYHV_BLK_MAX_REGIONS 8
#define PYHV_BLK_MAX_SEGMENTS 256 /* data descriptors per request done in C (Linux: seg_max) */
#define PYHV_BLK_CAUGHT_UP 0      /* every available chain was completed */
#define PYHV_BLK_DECLINED 1       /* the chain at next_avail is Python's */

struct pyhv_ram_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t host; /* where the region is mapped in this process */
};

struct pyhv_blk_queue {
    struct pyhv_ram_region regions[PYHV_BLK_MAX_REGIONS];
    uint32_t region_count;
    uint32_t size;       /* queue size: a power of 2 (checked by Python's Virtqueue) */
    uint64_t desc;       /* host addresses of the three parts, inside one region each */
    uint64_t avail;
    uint64_t used;
    uint32_t next_avail; /* free-running u16 positions, shared with Virtqueue */
    uint32_t next_used;
    int fd;
    int read_only;
    uint64_t capacity_sectors;
    uint64_t completed;  /* requests completed by C since the queue was set up */
};

int pyhv_blk_process(struct pyhv_blk_queue *queue);
/* Store a 16-bit ring field, then load another, with a full barrier between (x86 may otherwise
 * let the load pass the store): the device's half of notification suppression (§2.7.10). */
uint32_t pyhv_store16_then_load16(uint64_t store_address, uint32_t value, uint64_t load_address);
/* PYHV_CFFI_END */

#endif
