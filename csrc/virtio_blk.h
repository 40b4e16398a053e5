/*
 * pyhv's C fast path for virtio-blk: the common read and write request on a raw file, or on a
 * qcow2 image whose clusters the request touches are plainly mapped (struct pyhv_blk_map).
 *
 * Called by the device's I/O thread (hypervisor/virtio/blk.py) with the GIL released. It
 * takes chains from a split virtqueue's available ring (virtio 1.2 §2.7.6), and completes only a
 * request it can finish exactly as hypervisor/virtio/blk_request.py would: a 16-byte header
 * descriptor, data descriptors all device-writable (IN) or all device-readable (OUT), a 1-byte
 * device-writable status descriptor, direct descriptors each inside one RAM region, a payload
 * of whole sectors inside the disk, and a preadv/pwritev that moves every byte. Anything else,
 * including every error, is declined: the chain stays on the ring for the Python path, which
 * owns every other case and every error status, so request semantics live in one place.
 *
 * On qcow2 C knows no qcow2: Python (hypervisor/block/qcow2, through hypervisor/virtio/blk.py)
 * puts into a pyhv_blk_map the guest clusters whose data is one standard cluster of the image
 * file at a known host offset (qcow2.rst "Standard Cluster Descriptor": not compressed, not a
 * zero cluster, no subcluster bitmap, no external data file), writable only when the L2 entry has
 * COPIED set ("refcount is exactly one", so an in-place write needs no metadata change). C splits
 * a request at cluster boundaries and declines it whole if one cluster is not in the map. Python
 * clears the map (a generation bump) on every change of L1 or L2 entries, under the image's
 * lock, which the I/O thread also holds while it is in pyhv_blk_process.
 */
#ifndef PYHV_VIRTIO_BLK_H
#define PYHV_VIRTIO_BLK_H

#include <stdint.h>

/* PYHV_CFFI_BEGIN */
#define PYHV_BLK_MAX_REGIONS 8
#define PYHV_BLK_MAX_SEGMENTS 256 /* data descriptors per request done in C (Linux: seg_max) */
#define PYHV_BLK_CAUGHT_UP 0      /* every available chain was completed */
#define PYHV_BLK_DECLINED 1       /* the chain at next_avail is Python's */

#define PYHV_BLK_MAP_ENTRIES 65536 /* direct-mapped by guest cluster index; a power of 2 */
#define PYHV_BLK_MAP_WRITABLE 1    /* in pyhv_blk_map_entry.host: COPIED was set (host is aligned) */

struct pyhv_blk_map_entry {
    uint64_t key;        /* guest cluster index + 1 (0: never filled) */
    uint64_t host;       /* byte offset of the cluster in the image file | PYHV_BLK_MAP_WRITABLE */
    uint64_t generation; /* the map's generation when filled; any other is stale */
};

struct pyhv_blk_map {
    struct pyhv_blk_map_entry entries[PYHV_BLK_MAP_ENTRIES];
    uint64_t generation; /* bumped by Python on every L1/L2 change: every entry goes stale at once */
    uint64_t disk_bytes; /* the image's virtual size: nothing at or past it is served */
    uint64_t file_bytes; /* the image file's size when last filled: no I/O past it */
    uint32_t cluster_bits;
    uint32_t enabled;    /* 0: every request is declined (image closed, or not set up) */
};

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
    struct pyhv_blk_map *map; /* NULL: fd is the disk itself (raw); else the qcow2 image file */
    uint64_t capacity_sectors;
    uint64_t completed;  /* requests completed by C since the queue was set up */
};

int pyhv_blk_process(struct pyhv_blk_queue *queue);
/* Python's fill of the map: hosts[i] is guest cluster first + i's host offset (with
 * PYHV_BLK_MAP_WRITABLE), or 0 for a cluster that is not plainly mapped (left out). */
void pyhv_blk_map_fill(struct pyhv_blk_map *map, uint64_t first, const uint64_t *hosts, uint32_t count);
/* Store a 16-bit ring field, then load another, with a full barrier between (x86 may otherwise
 * let the load pass the store): the device's half of notification suppression (§2.7.10). */
uint32_t pyhv_store16_then_load16(uint64_t store_address, uint32_t value, uint64_t load_address);
/* PYHV_CFFI_END */

#endif
