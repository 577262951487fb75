# Declarations of _abi.h: the io_uring and zcrx kernel ABI used by iouzcrx.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "_abi.h" nogil:
    enum:
        IOUZ_SETUP_CQSIZE
        IOUZ_SETUP_CLAMP
        IOUZ_SETUP_SUBMIT_ALL
        IOUZ_SETUP_COOP_TASKRUN
        IOUZ_SETUP_TASKRUN_FLAG
        IOUZ_SETUP_CQE32
        IOUZ_SETUP_SINGLE_ISSUER
        IOUZ_SETUP_DEFER_TASKRUN
        IOUZ_SETUP_NO_SQARRAY
        IOUZ_SETUP_CQE_MIXED
        IOUZ_FEAT_SINGLE_MMAP
        IOUZ_FEAT_NODROP
        IOUZ_FEAT_EXT_ARG
        IOUZ_FEAT_RECVSEND_BUNDLE
        IOUZ_SQ_CQ_OVERFLOW
        IOUZ_SQ_TASKRUN
        IOUZ_CQ_EVENTFD_DISABLED

        IOUZ_OP_NOP
        IOUZ_OP_READ
        IOUZ_OP_POLL_ADD
        IOUZ_OP_ACCEPT
        IOUZ_OP_ASYNC_CANCEL
        IOUZ_OP_CLOSE
        IOUZ_OP_SEND
        IOUZ_OP_RECV
        IOUZ_OP_SHUTDOWN
        IOUZ_OP_RECV_ZC
        IOUZ_SQE_BUFFER_SELECT
        IOUZ_RECVSEND_POLL_FIRST
        IOUZ_RECV_MULTISHOT
        IOUZ_ACCEPT_MULTISHOT
        IOUZ_ASYNC_CANCEL_ALL
        IOUZ_ASYNC_CANCEL_FD
        IOUZ_ASYNC_CANCEL_ANY

        IOUZ_CQE_F_BUFFER
        IOUZ_CQE_F_MORE
        IOUZ_CQE_F_SOCK_NONEMPTY
        IOUZ_CQE_F_BUF_MORE
        IOUZ_CQE_F_SKIP
        IOUZ_CQE_F_32
        IOUZ_CQE_BUFFER_SHIFT

        IOUZ_ENTER_GETEVENTS
        IOUZ_ENTER_EXT_ARG

        IOUZ_REGISTER_EVENTFD
        IOUZ_UNREGISTER_EVENTFD
        IOUZ_REGISTER_PROBE
        IOUZ_REGISTER_PBUF_RING
        IOUZ_UNREGISTER_PBUF_RING
        IOUZ_PBUF_RING_INC
        IOUZ_REGISTER_ZCRX_IFQ
        IOUZ_REGISTER_QUERY
        IOUZ_REGISTER_ZCRX_CTRL
        IOUZ_PROBE_OP_SUPPORTED
        IOUZ_PROBE_OPS
        IOUZ_QUERY_OPCODES
        IOUZ_QUERY_ZCRX
        IOUZ_QUERY_ZCRX_EVENT

        IOUZ_ZCRX_REG_IMPORT
        IOUZ_ZCRX_REG_NODEV
        IOUZ_ZCRX_FEATURE_RX_PAGE_SIZE
        IOUZ_ZCRX_FEATURE_EVENT
        IOUZ_ZCRX_AREA_SHIFT
        IOUZ_RQ_MAX_ENTRIES
        IOUZ_MEM_REGION_TYPE_USER
        IOUZ_ZCRX_CTRL_FLUSH_RQ
        IOUZ_ZCRX_CTRL_EXPORT
        IOUZ_ZCRX_CTRL_ARM_EVENT
        IOUZ_ZCRX_EVENT_ALLOC_FAIL
        IOUZ_ZCRX_EVENT_COPY
        IOUZ_ZCRX_EVENT_TYPES
        IOUZ_ZCRX_EVENT_DESC_FLAG_STATS
        IOUZ_BUF_RING_TAIL_OFFSET

    const uint64_t IOUZ_OFF_SQ_RING
    const uint64_t IOUZ_OFF_SQES
    const uint64_t IOUZ_ZCRX_AREA_MASK

    struct iouz_sqring_offsets:
        uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array

    struct iouz_cqring_offsets:
        uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags

    struct iouz_params:
        uint32_t sq_entries
        uint32_t cq_entries
        uint32_t flags
        uint32_t features
        iouz_sqring_offsets sq_off
        iouz_cqring_offsets cq_off

    struct iouz_sqe:
        uint8_t opcode
        uint8_t flags
        uint16_t ioprio
        int32_t fd
        uint64_t off
        uint64_t addr
        uint32_t len
        uint32_t op_flags
        uint64_t user_data
        uint16_t buf_group
        uint32_t file_index

    struct iouz_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags

    struct iouz_zcrx_cqe:
        uint64_t off

    struct iouz_getevents_arg:
        uint64_t sigmask
        uint32_t sigmask_sz
        uint32_t min_wait_usec
        uint64_t ts

    struct iouz_timespec:
        int64_t tv_sec
        int64_t tv_nsec

    struct iouz_probe_op:
        uint8_t op
        uint16_t flags

    struct iouz_probe:
        uint8_t last_op
        uint8_t ops_len
        iouz_probe_op ops[256]

    struct iouz_query_hdr:
        uint64_t next_entry
        uint64_t query_data
        uint32_t query_op
        uint32_t size
        int32_t result

    struct iouz_query_opcodes:
        uint32_t nr_request_opcodes
        uint32_t nr_register_opcodes
        uint64_t feature_flags
        uint64_t ring_setup_flags
        uint64_t enter_flags
        uint64_t sqe_flags
        uint32_t nr_query_opcodes

    struct iouz_query_zcrx:
        uint64_t register_flags
        uint64_t area_flags
        uint32_t nr_ctrl_opcodes
        uint32_t features
        uint32_t rq_hdr_size
        uint32_t rq_hdr_alignment

    struct iouz_query_zcrx_event:
        uint32_t event_flags
        uint32_t stats_size
        uint32_t stats_off_alignment

    struct iouz_region_desc:
        uint64_t user_addr
        uint64_t size
        uint32_t flags
        uint64_t mmap_offset

    struct iouz_zcrx_offsets:
        uint32_t head
        uint32_t tail
        uint32_t rqes

    struct iouz_zcrx_area_reg:
        uint64_t addr
        uint64_t len
        uint64_t rq_area_token
        uint32_t flags

    struct iouz_zcrx_ifq_reg:
        uint32_t if_idx
        uint32_t if_rxq
        uint32_t rq_entries
        uint32_t flags
        uint64_t area_ptr
        uint64_t region_ptr
        iouz_zcrx_offsets offsets
        uint32_t zcrx_id
        uint32_t rx_buf_len
        uint64_t event_desc

    struct iouz_zcrx_rqe:
        uint64_t off
        uint32_t len
        uint32_t pad

    struct iouz_zcrx_ctrl:
        uint32_t zcrx_id
        uint32_t op
        uint64_t payload[6]

    struct iouz_zcrx_event_desc:
        uint64_t user_data
        uint32_t type_mask
        uint32_t flags
        uint64_t stats_offset

    struct iouz_zcrx_stats:
        uint64_t copy_count
        uint64_t copy_bytes

    struct iouz_buf:
        uint64_t addr
        uint32_t len
        uint16_t bid

    struct iouz_buf_reg:
        uint64_t ring_addr
        uint32_t ring_entries
        uint16_t bgid
        uint16_t flags

    int iouz_setup(unsigned entries, iouz_params *p)
    int iouz_enter(int fd, unsigned to_submit, unsigned min_complete,
                   unsigned flags, void *arg, size_t argsz)
    int iouz_register(int fd, unsigned opcode, void *arg, unsigned nr_args)

    uint32_t iouz_load_acquire(const uint32_t *p)
    uint32_t iouz_load_relaxed(const uint32_t *p)
    uint64_t iouz_load_relaxed64(const uint64_t *p)
    int iouz_exchange_int(int *p, int v)
    void iouz_store_release(uint32_t *p, uint32_t v)
    void iouz_store_release16(uint16_t *p, uint16_t v)
    void iouz_atomic_or(uint32_t *p, uint32_t bits)


cdef extern from "<errno.h>" nogil:
    # errno values the completion paths test (Cython's libc.errno lacks some).
    enum:
        ECANCELED
        ENOBUFS
        ENOSPC
        ENOMEM
        EINTR
        EAGAIN
        EBUSY
        EINVAL
        EFAULT
