/*
 * Freestanding test guest: a minimal virtio-mmio virtio-blk driver (virtio 1.2 §4.2.3, §2.7.13,
 * §5.2.6), polling the used ring instead of taking interrupts. c_entry.S runs main() at CPL3
 * with IOPL=3, so on kvm_pvm hosts its loops run natively while register accesses still exit;
 * main writes its own exit status to the debug-exit port.
 *
 * Parameters (the common block of common.S, at GUEST_BASE):
 *   exit code  status written to the debug-exit port when every check passed
 *   mode       0 functional test: negotiate, write a pattern, flush, read it back, GET_ID
 *              1 benchmark: `count` sequential 1 MiB reads (wrapping at the disk's end)
 *              2 benchmark: `count` random 4 KiB reads
 *              3 read-only test: RO is offered, a write fails with IOERR, a read works
 *   port       requests kept in flight in modes 1 and 2 (1 to MAX_DEPTH; 0 means 1)
 *   count      number of requests in modes 1 and 2
 * The device is found by scanning the 4 KiB windows from VIRTIO_SCAN_BASE for the first
 * virtio-mmio version 2 block device. Failures exit with a code from enum failure below, so a
 * test names the step that went wrong.
 *
 * Memory (identity-mapped by the entry code): rings and request headers at 0x10000-0x13fff,
 * data buffers of up to 1 MiB per request in flight from 0x100000, so the guest needs 2 MiB of
 * RAM, and 1 + MAX_DEPTH MiB for the sequential benchmark at full depth.
 */
#include <stdint.h>

#define GUEST_BASE 0x1000
#define PARAM_EXIT_CODE (GUEST_BASE + 2)
#define PARAM_MODE (GUEST_BASE + 3)
#define PARAM_PORT (GUEST_BASE + 4)
#define PARAM_COUNT (GUEST_BASE + 8)
#define DEBUG_EXIT_PORT 0x501

#define VIRTIO_SCAN_BASE 0xd0000000UL
#define VIRTIO_SCAN_WINDOWS 64
#define VIRTIO_WINDOW 0x1000

/* §4.2.2 MMIO Device Register Layout. */
#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG 0x100
#define VIRTIO_MAGIC 0x74726976
#define VIRTIO_ID_BLOCK 2

/* §2.1 device status, §6 and §5.2.3 feature bits. */
#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define F_BLK_RO 5
#define F_BLK_FLUSH 9
#define F_VERSION_1 32

/* §2.7.5 descriptor flags; §5.2.6 request types and status. */
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define S_OK 0
#define S_IOERR 1
#define SECTOR 512

#define QUEUE_SIZE 16
#define DESC_TABLE 0x10000UL
#define AVAIL_RING 0x11000UL
#define USED_RING 0x12000UL
#define REQUEST_HEADER 0x13000UL
#define REQUEST_STATUS 0x13100UL
#define ID_BUFFER 0x13200UL
#define DATA_BUFFER 0x100000UL
#define BIG_READ (1024 * 1024)
#define SMALL_READ 4096
#define MAX_DEPTH 5 /* 3 descriptors each in a queue of 16 */
#define PATTERN_SECTORS 8
#define PATTERN_START 3

enum failure {
    FAIL_NO_DEVICE = 0x10,
    FAIL_FEATURES = 0x11,
    FAIL_FEATURES_OK = 0x12,
    FAIL_QUEUE = 0x13,
    FAIL_SMALL_DISK = 0x14,
    FAIL_WRITE = 0x20,
    FAIL_FLUSH = 0x21,
    FAIL_READ = 0x22,
    FAIL_PATTERN = 0x23,
    FAIL_GET_ID = 0x24,
    FAIL_USED_LENGTH = 0x25,
    FAIL_NOT_READ_ONLY = 0x30,
    FAIL_WRITE_ALLOWED = 0x31,
    FAIL_BENCH_READ = 0x40,
    FAIL_BENCH_LENGTH = 0x41,
    FAIL_MODE = 0x7f,
};

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[QUEUE_SIZE];
    uint16_t used_event;
};

#define USED_F_NO_NOTIFY 1 /* §2.7.8: the device polls and needs no notification */

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[QUEUE_SIZE];
    uint16_t avail_event;
};

struct blk_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

static volatile uint8_t *regs;
static uint16_t avail_idx;
static uint16_t used_seen;

#define barrier() __asm__ volatile("" ::: "memory")

static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static __attribute__((noreturn)) void finish(uint8_t status)
{
    for (;;)
        outb(DEBUG_EXIT_PORT, status);
}

static inline uint32_t reg_read(uint32_t offset)
{
    return *(volatile uint32_t *)(regs + offset);
}

static inline void reg_write(uint32_t offset, uint32_t value)
{
    *(volatile uint32_t *)(regs + offset) = value;
}

static void zero(volatile uint8_t *p, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        p[i] = 0;
}

static int find_device(void)
{
    for (int window = 0; window < VIRTIO_SCAN_WINDOWS; window++) {
        regs = (volatile uint8_t *)(VIRTIO_SCAN_BASE + (uint64_t)window * VIRTIO_WINDOW);
        if (reg_read(REG_MAGIC) == VIRTIO_MAGIC && reg_read(REG_VERSION) == 2 &&
            reg_read(REG_DEVICE_ID) == VIRTIO_ID_BLOCK)
            return 1;
    }
    return 0;
}

static uint64_t device_features(void)
{
    reg_write(REG_DEVICE_FEATURES_SEL, 1);
    uint64_t high = reg_read(REG_DEVICE_FEATURES);
    reg_write(REG_DEVICE_FEATURES_SEL, 0);
    return (high << 32) | reg_read(REG_DEVICE_FEATURES);
}

/* §3.1.1 Driver Requirements: Device Initialization, steps 1-8. Returns the offered features. */
static uint64_t init_device(void)
{
    avail_idx = 0; /* the flat binary has no loader to clear .bss */
    used_seen = 0;
    if (!find_device())
        finish(FAIL_NO_DEVICE);
    reg_write(REG_STATUS, 0);
    reg_write(REG_STATUS, STATUS_ACKNOWLEDGE);
    reg_write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    uint64_t offered = device_features();
    uint64_t wanted = (1ULL << F_VERSION_1) | (1ULL << F_BLK_FLUSH);
    if ((offered & wanted) != wanted)
        finish(FAIL_FEATURES);
    reg_write(REG_DRIVER_FEATURES_SEL, 0);
    reg_write(REG_DRIVER_FEATURES, (uint32_t)wanted);
    reg_write(REG_DRIVER_FEATURES_SEL, 1);
    reg_write(REG_DRIVER_FEATURES, (uint32_t)(wanted >> 32));
    reg_write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(reg_read(REG_STATUS) & STATUS_FEATURES_OK))
        finish(FAIL_FEATURES_OK);

    /* §4.2.3.2 Virtqueue Configuration. */
    reg_write(REG_QUEUE_SEL, 0);
    if (reg_read(REG_QUEUE_READY) != 0 || reg_read(REG_QUEUE_NUM_MAX) < QUEUE_SIZE)
        finish(FAIL_QUEUE);
    zero((volatile uint8_t *)DESC_TABLE, 3 * 0x1000);
    reg_write(REG_QUEUE_NUM, QUEUE_SIZE);
    reg_write(REG_QUEUE_DESC_LOW, (uint32_t)DESC_TABLE);
    reg_write(REG_QUEUE_DESC_HIGH, 0);
    reg_write(REG_QUEUE_DRIVER_LOW, (uint32_t)AVAIL_RING);
    reg_write(REG_QUEUE_DRIVER_HIGH, 0);
    reg_write(REG_QUEUE_DEVICE_LOW, (uint32_t)USED_RING);
    reg_write(REG_QUEUE_DEVICE_HIGH, 0);
    reg_write(REG_QUEUE_READY, 1);
    reg_write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    return offered;
}

static uint64_t capacity_sectors(void)
{
    /* §4.2.2.2: 64-bit config fields are read as two 32-bit halves. */
    uint64_t low = reg_read(REG_CONFIG);
    uint64_t high = reg_read(REG_CONFIG + 4);
    return (high << 32) | low;
}

/*
 * Request slot k uses descriptors 3k..3k+2, its own header and status byte: header, optional
 * data, status as one chain (§5.2.6), published on the available ring (§2.7.13). The caller
 * notifies once for everything it published.
 */
static void submit(unsigned slot, uint32_t type, uint64_t sector, uint64_t data, uint32_t length)
{
    volatile struct virtq_desc *desc = (volatile struct virtq_desc *)DESC_TABLE;
    volatile struct virtq_avail *avail = (volatile struct virtq_avail *)AVAIL_RING;
    volatile struct blk_header *header = (volatile struct blk_header *)(REQUEST_HEADER + 16 * slot);
    uint64_t status = REQUEST_STATUS + slot;
    uint16_t head = (uint16_t)(3 * slot);
    uint16_t last = head + 1;

    header->type = type;
    header->reserved = 0;
    header->sector = sector;
    *(volatile uint8_t *)status = 0xff;
    desc[head].addr = (uint64_t)header;
    desc[head].len = sizeof(struct blk_header);
    desc[head].flags = DESC_F_NEXT;
    desc[head].next = head + 1;
    if (length) {
        desc[head + 1].addr = data;
        desc[head + 1].len = length;
        desc[head + 1].flags = DESC_F_NEXT | (type == T_OUT ? 0 : DESC_F_WRITE);
        desc[head + 1].next = head + 2;
        last = head + 2;
    }
    desc[last].addr = status;
    desc[last].len = 1;
    desc[last].flags = DESC_F_WRITE;
    desc[last].next = 0;
    avail->ring[avail_idx % QUEUE_SIZE] = head;
    barrier(); /* x86 keeps stores in order; the compiler must too (§2.7.13.3) */
    avail_idx++;
    avail->idx = avail_idx;
    barrier();
}

static void notify(void)
{
    reg_write(REG_QUEUE_NOTIFY, 0);
}

/* Notify unless the device asked not to (virtio 1.2 §2.7.7.2, no VIRTIO_F_EVENT_IDX): a full
 * fence between publishing avail.idx and reading used.flags, matching the device's fence
 * between clearing the flag and reading avail.idx, so one of the two always sees the other. */
static void notify_if_needed(void)
{
    volatile struct virtq_used *used = (volatile struct virtq_used *)USED_RING;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!(used->flags & USED_F_NO_NOTIFY))
        notify();
}

/* Waits for the next used element; returns its slot and sets *status and *used_len. */
static unsigned reap(uint8_t *status, uint32_t *used_len)
{
    volatile struct virtq_used *used = (volatile struct virtq_used *)USED_RING;
    while (used->idx == used_seen)
        barrier();
    unsigned slot = used->ring[used_seen % QUEUE_SIZE].id / 3;
    *used_len = used->ring[used_seen % QUEUE_SIZE].len;
    used_seen++;
    *status = *(volatile uint8_t *)(REQUEST_STATUS + slot);
    return slot;
}

static uint8_t request(uint32_t type, uint64_t sector, uint64_t data, uint32_t length, uint32_t *used_len)
{
    uint8_t status;
    submit(0, type, sector, data, length);
    notify();
    reap(&status, used_len);
    return status;
}

static uint8_t pattern_byte(uint64_t i)
{
    return (uint8_t)(i * 7 + (i >> 9) + 0x5a);
}

static uint8_t functional_test(void)
{
    volatile uint8_t *buffer = (volatile uint8_t *)DATA_BUFFER;
    uint64_t length = PATTERN_SECTORS * SECTOR;
    uint32_t used_len;

    if (capacity_sectors() < PATTERN_START + PATTERN_SECTORS)
        return FAIL_SMALL_DISK;
    for (uint64_t i = 0; i < length; i++)
        buffer[i] = pattern_byte(i);
    if (request(T_OUT, PATTERN_START, DATA_BUFFER, length, &used_len) != S_OK)
        return FAIL_WRITE;
    if (request(T_FLUSH, 0, 0, 0, &used_len) != S_OK)
        return FAIL_FLUSH;
    zero(buffer, length);
    if (request(T_IN, PATTERN_START, DATA_BUFFER, length, &used_len) != S_OK)
        return FAIL_READ;
    if (used_len != length + 1)
        return FAIL_USED_LENGTH;
    for (uint64_t i = 0; i < length; i++)
        if (buffer[i] != pattern_byte(i))
            return FAIL_PATTERN;
    if (request(T_GET_ID, 0, ID_BUFFER, 20, &used_len) != S_OK)
        return FAIL_GET_ID;
    return 0;
}

static uint8_t read_only_test(uint64_t offered)
{
    uint32_t used_len;
    if (!(offered & (1ULL << F_BLK_RO)))
        return FAIL_NOT_READ_ONLY;
    if (request(T_OUT, 0, DATA_BUFFER, SECTOR, &used_len) != S_IOERR)
        return FAIL_WRITE_ALLOWED;
    if (request(T_IN, 0, DATA_BUFFER, SECTOR, &used_len) != S_OK)
        return FAIL_READ;
    return 0;
}

static uint64_t next_slot_sector(int sequential, uint64_t i, uint64_t slots, uint64_t sectors, uint64_t *random)
{
    if (sequential)
        return (i % slots) * sectors;
    /* xorshift64 (Marsaglia 2003): cheap, and enough to defeat read-ahead */
    *random ^= *random << 13;
    *random ^= *random >> 7;
    *random ^= *random << 17;
    return (*random % slots) * sectors;
}

/* `count` reads of 1 MiB (sequential) or 4 KiB (random), `depth` of them in flight. */
static uint8_t benchmark(int sequential, uint64_t count, unsigned depth)
{
    uint32_t size = sequential ? BIG_READ : SMALL_READ;
    uint64_t sectors = size / SECTOR;
    uint64_t slots = capacity_sectors() / sectors;
    uint64_t random = 0x9e3779b97f4a7c15ULL;
    uint64_t issued = 0, done = 0;
    uint32_t used_len;
    uint8_t status;

    if (slots == 0)
        return FAIL_SMALL_DISK;
    if (depth == 0)
        depth = 1;
    if (depth > MAX_DEPTH)
        depth = MAX_DEPTH;
    for (unsigned slot = 0; slot < depth && issued < count; slot++, issued++)
        submit(slot, T_IN, next_slot_sector(sequential, issued, slots, sectors, &random),
               DATA_BUFFER + (uint64_t)slot * size, size);
    notify();
    while (done < count) {
        unsigned slot = reap(&status, &used_len);
        done++;
        if (status != S_OK)
            return FAIL_BENCH_READ;
        if (used_len != size + 1)
            return FAIL_BENCH_LENGTH;
        if (issued < count) {
            submit(slot, T_IN, next_slot_sector(sequential, issued, slots, sectors, &random),
                   DATA_BUFFER + (uint64_t)slot * size, size);
            issued++;
            notify_if_needed();
        }
    }
    return 0;
}

/*
 * Called by the C entry code (c_entry.S) in 64-bit mode. Kept in plain .text: at -O2 gcc puts
 * `main` in .text.startup, which ld's default script places before every .text, so the entry
 * code would no longer start the flat binary at GUEST_BASE.
 */
__attribute__((section(".text"))) int main(void)
{
    uint8_t mode = *(volatile uint8_t *)PARAM_MODE;
    uint64_t count = *(volatile uint64_t *)PARAM_COUNT;
    uint64_t offered = init_device();
    uint8_t failure;

    switch (mode) {
    case 0:
        failure = functional_test();
        break;
    case 1:
    case 2:
        failure = benchmark(mode == 1, count, *(volatile uint16_t *)PARAM_PORT);
        break;
    case 3:
        failure = read_only_test(offered);
        break;
    default:
        failure = FAIL_MODE;
    }
    reg_write(REG_STATUS, 0); /* reset: the device stops using our memory */
    finish(failure ? failure : *(volatile uint8_t *)PARAM_EXIT_CODE);
}
