/*
 * io_uring and zcrx kernel ABI as used by iouzcrx.
 *
 * The distribution's <linux/io_uring.h> predates zero-copy receive, so the
 * layouts are declared here under our own names (iouz_*) and pinned with
 * static asserts.  Only what the library uses is declared.
 */
#ifndef IOUZCRX_ABI_H
#define IOUZCRX_ABI_H

#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>

#define IOUZ_ASSERT_SIZE(type, size) \
    _Static_assert(sizeof(type) == (size), #type " has the wrong size")
#define IOUZ_ASSERT_OFFSET(type, field, off) \
    _Static_assert(offsetof(type, field) == (off), #type "." #field " is misplaced")

/* ---- syscalls (same numbers on x86-64 and the generic table) ---------- */

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#define __NR_io_uring_enter 426
#define __NR_io_uring_register 427
#endif

/* ---- io_uring_setup ---------------------------------------------------- */

#define IOUZ_SETUP_CQSIZE         (1u << 3)
#define IOUZ_SETUP_CLAMP          (1u << 4)
#define IOUZ_SETUP_R_DISABLED     (1u << 6)
#define IOUZ_SETUP_SUBMIT_ALL     (1u << 7)
#define IOUZ_SETUP_COOP_TASKRUN   (1u << 8)
#define IOUZ_SETUP_TASKRUN_FLAG   (1u << 9)
#define IOUZ_SETUP_CQE32          (1u << 11)
#define IOUZ_SETUP_SINGLE_ISSUER  (1u << 12)
#define IOUZ_SETUP_DEFER_TASKRUN  (1u << 13)
#define IOUZ_SETUP_NO_SQARRAY     (1u << 16)
#define IOUZ_SETUP_CQE_MIXED      (1u << 18)

#define IOUZ_FEAT_SINGLE_MMAP     (1u << 0)
#define IOUZ_FEAT_NODROP          (1u << 1)
#define IOUZ_FEAT_EXT_ARG         (1u << 8)
#define IOUZ_FEAT_RECVSEND_BUNDLE (1u << 14)

struct iouz_sqring_offsets {
    uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
    uint64_t user_addr;
};

struct iouz_cqring_offsets {
    uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
    uint64_t user_addr;
};

struct iouz_params {
    uint32_t sq_entries;
    uint32_t cq_entries;
    uint32_t flags;
    uint32_t sq_thread_cpu;
    uint32_t sq_thread_idle;
    uint32_t features;
    uint32_t wq_fd;
    uint32_t resv[3];
    struct iouz_sqring_offsets sq_off;
    struct iouz_cqring_offsets cq_off;
};
IOUZ_ASSERT_SIZE(struct iouz_sqring_offsets, 40);
IOUZ_ASSERT_SIZE(struct iouz_cqring_offsets, 40);
IOUZ_ASSERT_SIZE(struct iouz_params, 120);
IOUZ_ASSERT_OFFSET(struct iouz_params, sq_off, 40);
IOUZ_ASSERT_OFFSET(struct iouz_params, cq_off, 80);

#define IOUZ_OFF_SQ_RING  0x0ull
#define IOUZ_OFF_SQES     0x10000000ull

/* sq_flags bits */
#define IOUZ_SQ_CQ_OVERFLOW (1u << 1)
#define IOUZ_SQ_TASKRUN     (1u << 2)

/* cq_flags bits (written by the program, read by the kernel) */
#define IOUZ_CQ_EVENTFD_DISABLED (1u << 0)

/* ---- SQE / CQE ---------------------------------------------------------- */

struct iouz_sqe {
    uint8_t  opcode;
    uint8_t  flags;
    uint16_t ioprio;
    int32_t  fd;
    uint64_t off;          /* also addr2 */
    uint64_t addr;
    uint32_t len;
    uint32_t op_flags;     /* msg_flags, accept_flags, cancel_flags, ... */
    uint64_t user_data;
    uint16_t buf_group;    /* also buf_index */
    uint16_t personality;
    uint32_t file_index;   /* also zcrx_ifq_idx, optlen, splice_fd_in */
    uint64_t addr3;
    uint64_t pad2;
};
IOUZ_ASSERT_SIZE(struct iouz_sqe, 64);
IOUZ_ASSERT_OFFSET(struct iouz_sqe, user_data, 32);
IOUZ_ASSERT_OFFSET(struct iouz_sqe, buf_group, 40);
IOUZ_ASSERT_OFFSET(struct iouz_sqe, file_index, 44);

struct iouz_cqe {
    uint64_t user_data;
    int32_t  res;
    uint32_t flags;
};
IOUZ_ASSERT_SIZE(struct iouz_cqe, 16);

/* The second half of a 32-byte RECV_ZC completion. */
struct iouz_zcrx_cqe {
    uint64_t off;
    uint64_t pad;
};
IOUZ_ASSERT_SIZE(struct iouz_zcrx_cqe, 16);

#define IOUZ_OP_NOP          0
#define IOUZ_OP_READ         22
#define IOUZ_OP_POLL_ADD     6
#define IOUZ_OP_ACCEPT       13
#define IOUZ_OP_ASYNC_CANCEL 14
#define IOUZ_OP_CLOSE        19
#define IOUZ_OP_SEND         26
#define IOUZ_OP_RECV         27
#define IOUZ_OP_SHUTDOWN     34
#define IOUZ_OP_RECV_ZC      58

#define IOUZ_SQE_BUFFER_SELECT (1u << 5)

/* ioprio flags of the network opcodes */
#define IOUZ_RECVSEND_POLL_FIRST (1u << 0)
#define IOUZ_RECV_MULTISHOT      (1u << 1)
#define IOUZ_ACCEPT_MULTISHOT    (1u << 0)

#define IOUZ_ASYNC_CANCEL_ALL (1u << 0)
#define IOUZ_ASYNC_CANCEL_FD  (1u << 1)
#define IOUZ_ASYNC_CANCEL_ANY (1u << 2)

#define IOUZ_CQE_F_BUFFER   (1u << 0)
#define IOUZ_CQE_F_MORE     (1u << 1)
#define IOUZ_CQE_F_SOCK_NONEMPTY (1u << 2)
#define IOUZ_CQE_F_BUF_MORE (1u << 4)  /* incremental ring: this bid takes more data */
#define IOUZ_CQE_F_SKIP     (1u << 5)
#define IOUZ_CQE_F_32       (1u << 15)
#define IOUZ_CQE_BUFFER_SHIFT 16

/* ---- io_uring_enter ------------------------------------------------------ */

#define IOUZ_ENTER_GETEVENTS (1u << 0)
#define IOUZ_ENTER_EXT_ARG   (1u << 3)

struct iouz_getevents_arg {
    uint64_t sigmask;
    uint32_t sigmask_sz;
    uint32_t min_wait_usec;
    uint64_t ts;
};
IOUZ_ASSERT_SIZE(struct iouz_getevents_arg, 24);

struct iouz_timespec {
    int64_t tv_sec;
    int64_t tv_nsec;
};

/* ---- io_uring_register --------------------------------------------------- */

#define IOUZ_REGISTER_EVENTFD        4
#define IOUZ_UNREGISTER_EVENTFD      5
#define IOUZ_REGISTER_PROBE          8
#define IOUZ_REGISTER_PBUF_RING      22
#define IOUZ_UNREGISTER_PBUF_RING    23
#define IOUZ_PBUF_RING_INC           2   /* iouz_buf_reg.flags: incremental consumption (6.12+) */
#define IOUZ_REGISTER_ZCRX_IFQ       32
#define IOUZ_REGISTER_QUERY          35
#define IOUZ_REGISTER_ZCRX_CTRL      36

struct iouz_probe_op {
    uint8_t  op;
    uint8_t  resv;
    uint16_t flags;
    uint32_t resv2;
};
#define IOUZ_PROBE_OP_SUPPORTED 1u
#define IOUZ_PROBE_OPS 256
struct iouz_probe {
    uint8_t  last_op;
    uint8_t  ops_len;
    uint16_t resv;
    uint32_t resv2[3];
    struct iouz_probe_op ops[IOUZ_PROBE_OPS];
};
IOUZ_ASSERT_SIZE(struct iouz_probe_op, 8);
IOUZ_ASSERT_OFFSET(struct iouz_probe, ops, 16);

/* IORING_REGISTER_QUERY (6.18+) */
struct iouz_query_hdr {
    uint64_t next_entry;
    uint64_t query_data;
    uint32_t query_op;
    uint32_t size;
    int32_t  result;
    uint32_t resv[3];
};
IOUZ_ASSERT_SIZE(struct iouz_query_hdr, 40);

#define IOUZ_QUERY_OPCODES    0
#define IOUZ_QUERY_ZCRX       1
#define IOUZ_QUERY_ZCRX_EVENT 3

struct iouz_query_opcodes {
    uint32_t nr_request_opcodes;
    uint32_t nr_register_opcodes;
    uint64_t feature_flags;
    uint64_t ring_setup_flags;
    uint64_t enter_flags;
    uint64_t sqe_flags;
    uint32_t nr_query_opcodes;
    uint32_t pad;
};
IOUZ_ASSERT_SIZE(struct iouz_query_opcodes, 48);

struct iouz_query_zcrx {
    uint64_t register_flags;
    uint64_t area_flags;
    uint32_t nr_ctrl_opcodes;
    uint32_t features;
    uint32_t rq_hdr_size;
    uint32_t rq_hdr_alignment;
    uint64_t resv2;
};
IOUZ_ASSERT_SIZE(struct iouz_query_zcrx, 40);
IOUZ_ASSERT_OFFSET(struct iouz_query_zcrx, rq_hdr_size, 24);

/* IO_URING_QUERY_ZCRX_EVENT (7.2+) */
struct iouz_query_zcrx_event {
    uint32_t event_flags;          /* bit (1 << type) per event type */
    uint32_t stats_size;
    uint32_t stats_off_alignment;
    uint32_t resv1;
    uint64_t resv2[4];
};
IOUZ_ASSERT_SIZE(struct iouz_query_zcrx_event, 48);

/* ---- zcrx ---------------------------------------------------------------- */

#define IOUZ_ZCRX_REG_IMPORT   (1u << 0)
#define IOUZ_ZCRX_REG_NODEV    (1u << 1)
#define IOUZ_ZCRX_FEATURE_RX_PAGE_SIZE (1u << 0)
#define IOUZ_ZCRX_FEATURE_EVENT        (1u << 1)
#define IOUZ_ZCRX_AREA_SHIFT   48
#define IOUZ_ZCRX_AREA_MASK    (~((1ull << IOUZ_ZCRX_AREA_SHIFT) - 1))
#define IOUZ_RQ_MAX_ENTRIES    32768u
#define IOUZ_MEM_REGION_TYPE_USER 1u

#define IOUZ_ZCRX_CTRL_FLUSH_RQ   0
#define IOUZ_ZCRX_CTRL_EXPORT     1   /* 6.19+ */
#define IOUZ_ZCRX_CTRL_ARM_EVENT  2   /* 7.2+ */

/* zcrx events (7.2+): one CQE per armed type, then silence until re-armed. */
#define IOUZ_ZCRX_EVENT_ALLOC_FAIL 0
#define IOUZ_ZCRX_EVENT_COPY       1
#define IOUZ_ZCRX_EVENT_TYPES      2
#define IOUZ_ZCRX_EVENT_DESC_FLAG_STATS (1u << 0)

struct iouz_region_desc {
    uint64_t user_addr;
    uint64_t size;
    uint32_t flags;
    uint32_t id;
    uint64_t mmap_offset;
    uint64_t resv[4];
};
IOUZ_ASSERT_SIZE(struct iouz_region_desc, 64);

struct iouz_zcrx_offsets {
    uint32_t head;
    uint32_t tail;
    uint32_t rqes;
    uint32_t resv2;
    uint64_t resv[2];
};
IOUZ_ASSERT_SIZE(struct iouz_zcrx_offsets, 32);

struct iouz_zcrx_area_reg {
    uint64_t addr;
    uint64_t len;
    uint64_t rq_area_token;
    uint32_t flags;
    uint32_t dmabuf_fd;
    uint64_t resv2[2];
};
IOUZ_ASSERT_SIZE(struct iouz_zcrx_area_reg, 48);

struct iouz_zcrx_ifq_reg {
    uint32_t if_idx;
    uint32_t if_rxq;
    uint32_t rq_entries;
    uint32_t flags;
    uint64_t area_ptr;
    uint64_t region_ptr;
    struct iouz_zcrx_offsets offsets;
    uint32_t zcrx_id;
    uint32_t rx_buf_len;   /* 7.0+; reserved (must be 0) before */
    uint64_t event_desc;   /* 7.2+; reserved (must be 0) before */
    uint64_t resv[2];
};
IOUZ_ASSERT_SIZE(struct iouz_zcrx_ifq_reg, 96);
IOUZ_ASSERT_OFFSET(struct iouz_zcrx_ifq_reg, offsets, 32);
IOUZ_ASSERT_OFFSET(struct iouz_zcrx_ifq_reg, zcrx_id, 64);
IOUZ_ASSERT_OFFSET(struct iouz_zcrx_ifq_reg, rx_buf_len, 68);
IOUZ_ASSERT_OFFSET(struct iouz_zcrx_ifq_reg, event_desc, 72);

struct iouz_zcrx_rqe {
    uint64_t off;
    uint32_t len;
    uint32_t pad;
};
IOUZ_ASSERT_SIZE(struct iouz_zcrx_rqe, 16);

struct iouz_zcrx_ctrl {
    uint32_t zcrx_id;
    uint32_t op;
    uint64_t resv[2];
    uint64_t payload[6];
};
IOUZ_ASSERT_SIZE(struct iouz_zcrx_ctrl, 72);
/* payload[0]: zc_export.zcrx_fd (low 32 bits, out) or zc_arm_event.event_type. */

struct iouz_zcrx_event_desc {
    uint64_t user_data;
    uint32_t type_mask;
    uint32_t flags;
    uint64_t stats_offset;   /* into the refill ring's region */
    uint64_t resv2[9];
};
IOUZ_ASSERT_SIZE(struct iouz_zcrx_event_desc, 96);
IOUZ_ASSERT_OFFSET(struct iouz_zcrx_event_desc, stats_offset, 16);

/* The kernel adds to these with plain stores on its receive path. */
struct iouz_zcrx_stats {
    uint64_t copy_count;
    uint64_t copy_bytes;
};
IOUZ_ASSERT_SIZE(struct iouz_zcrx_stats, 16);

/* ---- provided buffer rings ----------------------------------------------- */

struct iouz_buf {
    uint64_t addr;
    uint32_t len;
    uint16_t bid;
    uint16_t resv;   /* in slot 0 this is the ring tail: never write it */
};
IOUZ_ASSERT_SIZE(struct iouz_buf, 16);
#define IOUZ_BUF_RING_TAIL_OFFSET 14

struct iouz_buf_reg {
    uint64_t ring_addr;
    uint32_t ring_entries;
    uint16_t bgid;
    uint16_t flags;
    uint32_t min_left;
    uint32_t resv[5];
};
IOUZ_ASSERT_SIZE(struct iouz_buf_reg, 40);

/* ---- raw syscalls: return -errno on failure, like the kernel ------------- */

static inline int iouz_setup(unsigned entries, struct iouz_params *p)
{
    long r = syscall(__NR_io_uring_setup, entries, p);
    return r < 0 ? -errno : (int)r;
}

static inline int iouz_enter(int fd, unsigned to_submit, unsigned min_complete,
                             unsigned flags, void *arg, size_t argsz)
{
    long r = syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, arg, argsz);
    return r < 0 ? -errno : (int)r;
}

static inline int iouz_register(int fd, unsigned opcode, void *arg, unsigned nr_args)
{
    long r = syscall(__NR_io_uring_register, fd, opcode, arg, nr_args);
    return r < 0 ? -errno : (int)r;
}

/* ---- memory ordering with the kernel ---------------------------------------
 * Every index shared with the kernel (SQ tail, CQ head/tail, refill ring
 * head/tail, buffer ring tail, sq_flags) goes through these, so the data
 * written before a tail store is visible to the kernel before the tail is. */

static inline uint32_t iouz_load_acquire(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline uint32_t iouz_load_relaxed(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void iouz_store_release(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* Only the tests write sq_flags (the kernel owns it): they raise a flag the
 * way the kernel does, with an atomic or. */
static inline void iouz_atomic_or(uint32_t *p, uint32_t bits)
{
    __atomic_fetch_or(p, bits, __ATOMIC_RELEASE);
}

/* A counter the kernel updates while we read it: one untorn 64-bit load. */
static inline uint64_t iouz_load_relaxed64(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

/* Take an fd out of its owner once, even when two threads close at once. */
static inline int iouz_exchange_int(int *p, int v)
{
    return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL);
}

static inline void iouz_store_release16(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

#endif /* IOUZCRX_ABI_H */
