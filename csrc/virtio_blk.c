/*
 * virtio-blk read and write requests on a raw file or a plainly mapped qcow2 image, done on the
 * device's I/O thread without Python (see virtio_blk.h for what is done here and what is left to
 * Python).
 *
 * Everything the guest controls is read once into locals before it is checked and used: a
 * descriptor (§2.7.5), the request header (§5.2.6), the ring entries. Addresses are guest
 * physical; each buffer must lie inside one region of guest RAM, checked without overflow.
 */
#define _GNU_SOURCE
#include "virtio_blk.h"

#include <errno.h>
#include <string.h>
#include <sys/uio.h>

#define DESC_F_NEXT 1     /* §2.7.5 */
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define BLK_T_IN 0        /* §5.2.6 */
#define BLK_T_OUT 1
#define BLK_S_OK 0
#define BLK_HEADER_BYTES 16
#define SECTOR_BYTES 512
#define MAX_CHAIN_BYTES (1ULL << 32) /* §2.7.5.2: the total length of a chain fits in 32 bits */
#define MAP_IOV_CHUNK 64  /* iovecs per preadv/pwritev of one host-contiguous run (qcow2) */

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* The host address of guest [gpa, gpa+len), or 0 when that is not inside one RAM region. */
static uint8_t *host_buffer(const struct pyhv_blk_queue *q, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < q->region_count && i < PYHV_BLK_MAX_REGIONS; i++) {
        const struct pyhv_ram_region *r = &q->regions[i];
        if (gpa >= r->gpa && len <= r->size && gpa - r->gpa <= r->size - len)
            return (uint8_t *)(uintptr_t)(r->host + (gpa - r->gpa));
    }
    return 0;
}

static void read_desc(const struct pyhv_blk_queue *q, uint32_t index, struct desc *out)
{
    /* One copy of the 16 bytes: the driver may change the table while we look (a buggy or
     * hostile one), and every check below is made on this copy. */
    memcpy(out, (const uint8_t *)(uintptr_t)q->desc + 16 * (size_t)index, sizeof(*out));
}

/* The host offset (with PYHV_BLK_MAP_WRITABLE) of guest cluster `cluster`, or 0 when the map
 * does not hold it in its current generation: a miss, which declines the request. */
static uint64_t map_lookup(const struct pyhv_blk_map *m, uint64_t cluster)
{
    const struct pyhv_blk_map_entry *e = &m->entries[cluster & (PYHV_BLK_MAP_ENTRIES - 1)];
    if (e->key != cluster + 1 || e->generation != m->generation)
        return 0;
    return e->host;
}

/* Whether every cluster of guest bytes [offset, offset+length) is in the map (writable, for a
 * write) and every byte's host place lies inside the image file. Checked for the whole request
 * before any byte moves, so a declined write has written nothing. The caller has checked that
 * the range is inside the disk the guest sees; it must also be inside the image's current size
 * (an applied snapshot may have shrunk it). */
static int map_covers(const struct pyhv_blk_map *m, uint64_t offset, uint64_t length, int is_read)
{
    uint64_t cluster_bytes = 1ULL << m->cluster_bits;
    if (!m->enabled || length > m->disk_bytes || offset > m->disk_bytes - length)
        return 0;
    for (uint64_t pos = offset, end = offset + length; pos < end;) {
        uint64_t in_cluster = pos & (cluster_bytes - 1);
        uint64_t n = cluster_bytes - in_cluster < end - pos ? cluster_bytes - in_cluster : end - pos;
        uint64_t host = map_lookup(m, pos >> m->cluster_bits);
        if (!host || (!is_read && !(host & PYHV_BLK_MAP_WRITABLE)))
            return 0;
        host &= ~(uint64_t)PYHV_BLK_MAP_WRITABLE;
        /* n <= cluster_bytes - in_cluster: never outside the cluster; and never past the file's
         * end (Python zero-fills such a read, and such a write grows the file it tracks). */
        if (host > m->file_bytes || in_cluster + n > m->file_bytes - host)
            return 0;
        pos += n;
    }
    return 1;
}

/* Move guest bytes [offset, offset+length) between the image file and the request's buffers
 * `iov`, one preadv/pwritev per run of clusters contiguous in the file (in chunks of at most
 * MAP_IOV_CHUNK buffers). map_covers said yes and nothing changed the map since: the image's
 * lock is held. 0 on an error or a short transfer (Python then does the whole request again). */
static int map_io(const struct pyhv_blk_map *m, int fd, int is_read, const struct iovec *iov, uint32_t segments,
                  uint64_t offset, uint64_t length)
{
    uint64_t cluster_bytes = 1ULL << m->cluster_bits;
    uint32_t segment = 0;
    uint64_t used = 0; /* bytes of iov[segment] already moved */
    uint64_t pos = offset, end = offset + length;
    while (pos < end) {
        uint64_t in_cluster = pos & (cluster_bytes - 1);
        uint64_t host = (map_lookup(m, pos >> m->cluster_bits) & ~(uint64_t)PYHV_BLK_MAP_WRITABLE) + in_cluster;
        uint64_t run = cluster_bytes - in_cluster < end - pos ? cluster_bytes - in_cluster : end - pos;
        while (pos + run < end) { /* the next cluster starts where this run ends, in guest and file */
            uint64_t next = map_lookup(m, (pos + run) >> m->cluster_bits) & ~(uint64_t)PYHV_BLK_MAP_WRITABLE;
            if (next != host + run)
                break;
            run += cluster_bytes < end - pos - run ? cluster_bytes : end - pos - run;
        }
        pos += run;
        while (run) {
            struct iovec part[MAP_IOV_CHUNK];
            int parts = 0;
            uint64_t bytes = 0;
            while (run > bytes && parts < MAP_IOV_CHUNK && segment < segments) {
                uint64_t left = iov[segment].iov_len - used;
                uint64_t take = left < run - bytes ? left : run - bytes;
                part[parts].iov_base = (uint8_t *)iov[segment].iov_base + used;
                part[parts].iov_len = take;
                parts++;
                bytes += take;
                used += take;
                if (used == iov[segment].iov_len) {
                    segment++;
                    used = 0;
                }
            }
            if (!bytes) /* cannot happen: the buffers hold exactly `length` bytes */
                return 0;
            ssize_t done = is_read ? preadv(fd, part, parts, (off_t)host) : pwritev(fd, part, parts, (off_t)host);
            if (done < 0 || (uint64_t)done != bytes)
                return 0;
            host += bytes;
            run -= bytes;
        }
    }
    return 1;
}

/* Complete the chain at `head` if it is a request C does exactly as Python would; 0 if declined
 * (nothing the guest can see has changed except, for a read, bytes of the data buffers, which
 * the Python path then writes again). Every "return 0" leaves the chain to Python. */
static int run_chain(struct pyhv_blk_queue *q, uint32_t head, uint32_t *used_len)
{
    struct iovec iov[PYHV_BLK_MAX_SEGMENTS];
    struct desc d;
    uint32_t index = head, steps = 0, segments = 0;
    uint64_t data_bytes = 0, chain_bytes = 0;
    int writes_to_guest = -1; /* the data direction, set by the first data descriptor */
    uint8_t header[BLK_HEADER_BYTES];
    uint8_t *status = 0;

    if (head >= q->size)
        return 0;
    for (;;) {
        if (++steps > q->size) /* a loop (§2.7.5.2); Python names it */
            return 0;
        read_desc(q, index, &d);
        chain_bytes += d.len;
        if ((d.flags & DESC_F_INDIRECT) || chain_bytes > MAX_CHAIN_BYTES)
            return 0;
        int last = !(d.flags & DESC_F_NEXT);
        int writable = (d.flags & DESC_F_WRITE) != 0;
        if (steps == 1) { /* the header: exactly struct virtio_blk_req's first 16 bytes */
            if (writable || d.len != BLK_HEADER_BYTES || last)
                return 0;
            uint8_t *host = host_buffer(q, d.addr, BLK_HEADER_BYTES);
            if (!host)
                return 0;
            memcpy(header, host, sizeof(header));
        } else if (last) { /* the status byte, alone in the last descriptor */
            if (!writable || d.len != 1 || !(status = host_buffer(q, d.addr, 1)))
                return 0;
            break;
        } else { /* data, all in one direction; an empty descriptor is Python's (§2.7.4.2 order
                  * rules still apply to it there) */
            if (writes_to_guest < 0)
                writes_to_guest = writable;
            if (!d.len || writable != writes_to_guest || segments == PYHV_BLK_MAX_SEGMENTS)
                return 0;
            uint8_t *host = host_buffer(q, d.addr, d.len);
            if (!host)
                return 0;
            iov[segments].iov_base = host;
            iov[segments].iov_len = d.len;
            segments++;
            data_bytes += d.len;
        }
        if (d.next >= q->size)
            return 0;
        index = d.next;
    }

    uint32_t type;
    uint64_t sector;
    memcpy(&type, header, 4); /* le32 type, le32 reserved, le64 sector (x86: little endian) */
    memcpy(&sector, header + 8, 8);
    uint64_t sectors = data_bytes / SECTOR_BYTES;
    int is_read = type == BLK_T_IN;
    if ((type != BLK_T_IN && type != BLK_T_OUT) || (segments && writes_to_guest != is_read) ||
        data_bytes % SECTOR_BYTES || sector > q->capacity_sectors || sectors > q->capacity_sectors - sector ||
        (!is_read && q->read_only))
        return 0;
    if (q->map) {
        uint64_t offset = sector * SECTOR_BYTES;
        if (!map_covers(q->map, offset, data_bytes, is_read) ||
            (segments && !map_io(q->map, q->fd, is_read, iov, segments, offset, data_bytes)))
            return 0;
    } else if (segments) {
        off_t offset = (off_t)(sector * SECTOR_BYTES);
        ssize_t done = is_read ? preadv(q->fd, iov, (int)segments, offset) : pwritev(q->fd, iov, (int)segments, offset);
        if (done < 0 || (uint64_t)done != data_bytes) /* errors, EOF and short transfers */
            return 0;
    }
    *status = BLK_S_OK;
    *used_len = (uint32_t)((is_read ? data_bytes : 0) + 1);
    return 1;
}

int pyhv_blk_process(struct pyhv_blk_queue *q)
{
    volatile uint16_t *avail = (volatile uint16_t *)(uintptr_t)q->avail;
    volatile uint16_t *used16 = (volatile uint16_t *)(uintptr_t)q->used;
    volatile uint32_t *used32 = (volatile uint32_t *)(uintptr_t)q->used;
    /* avail.idx once per call, like Python's iter_available; acquire so the ring entries and
     * descriptors the driver wrote before it are seen (§2.7.13.3). */
    uint16_t avail_idx = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE);
    uint16_t next_avail = (uint16_t)q->next_avail, next_used = (uint16_t)q->next_used;
    if ((uint16_t)(avail_idx - next_avail) > q->size) /* Python raises the reset */
        return PYHV_BLK_DECLINED;
    int result = PYHV_BLK_CAUGHT_UP;
    while (next_avail != avail_idx) {
        uint32_t head = avail[2 + next_avail % q->size], used_len = 0;
        if (!run_chain(q, head, &used_len)) {
            result = PYHV_BLK_DECLINED;
            break;
        }
        /* §2.7.8: the element, then used.idx with release order, so the driver never sees the
         * index before the element and the status byte. */
        uint32_t word = 1 + 2 * (next_used % q->size);
        used32[word] = head;
        used32[word + 1] = used_len;
        next_used++;
        __atomic_store_n(&used16[1], next_used, __ATOMIC_RELEASE);
        next_avail++;
        q->completed++;
    }
    q->next_avail = next_avail;
    q->next_used = next_used;
    return result;
}

void pyhv_blk_map_fill(struct pyhv_blk_map *m, uint64_t first, const uint64_t *hosts, uint32_t count)
{
    for (uint32_t i = 0; i < count; i++) {
        if (!(hosts[i] & ~(uint64_t)PYHV_BLK_MAP_WRITABLE)) /* not plainly mapped (offset 0 is the header) */
            continue;
        struct pyhv_blk_map_entry *e = &m->entries[(first + i) & (PYHV_BLK_MAP_ENTRIES - 1)];
        e->key = first + i + 1;
        e->host = hosts[i];
        e->generation = m->generation;
    }
}

uint32_t pyhv_store16_then_load16(uint64_t store_address, uint32_t value, uint64_t load_address)
{
    /* A sequentially consistent store is an XCHG on x86: nothing after it, the load included,
     * is done before the store is visible to the driver's vCPU. */
    __atomic_store_n((uint16_t *)(uintptr_t)store_address, (uint16_t)value, __ATOMIC_SEQ_CST);
    return __atomic_load_n((const uint16_t *)(uintptr_t)load_address, __ATOMIC_SEQ_CST);
}
