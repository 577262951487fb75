/*
 * zcrx_receiver: the C reference receiver on io_uring RECV_ZC in copy mode.
 *
 *   zcrx_receiver --scenario {bulk,rr,short} --connections N
 *                 [--request-size K --response-size R] [--buffer-size S]
 *                 [--area-size A] [--rq-entries E] [--verbose]
 *
 * One thread, one io_uring.  An interface queue is registered with
 * ZCRX_REG_NODEV (no NIC: the kernel copies every TCP segment into our area,
 * Linux >= 7.1, CAP_NET_ADMIN), so this measures the RECV_ZC completion and
 * refill machinery rather than NIC zero copy.  A (default 64 MiB) is the area,
 * E (default 4096) the refill ring size; --buffer-size is accepted for CLI
 * compatibility with recv_receiver and ignored (chunks are pages).
 *
 * Connections come from a multishot ACCEPT on the ring; each gets a multishot
 * RECV_ZC.  Every data completion counts as a chunk and its buffer goes
 * straight back to the refill ring without the data being read, the way a
 * consumer that only forwards or discards would behave; the refill tail is
 * published and the ring flushed once per reaped batch.
 *
 *   bulk   N connections received to EOF;
 *   rr     one connection (TCP_NODELAY), an R-byte send() after every whole
 *          K-byte request;
 *   short  N connections, each closed as soon as its EOF arrives.
 *
 * Prints "READY <port>" once listening on 127.0.0.1, then at the end the same
 * JSON line as recv_receiver: {"bytes", "chunks", "connections", "seconds",
 * "cpu_user", "cpu_sys", "maxrss_kb", "rss_mid_kb"}; the window opens when the
 * first accepted connection is reaped.  --verbose adds counters on stderr.
 *
 * Exit codes: 0 success, 1 error, 2 RECV_ZC copy mode is not available here
 * (old kernel, io_uring disabled, or no CAP_NET_ADMIN).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "../../iouzcrx/_abi.h"

#define PROGRAM "zcrx_receiver"
#include "bench.h"

#define PAGE 4096u
#define SQ_ENTRIES 256u
/* Copy mode posts one completion per page at most, so a busy connection
 * produces many CQEs per wakeup: a large CQ keeps -ENOSPC re-arms rare. */
#define CQ_ENTRIES 8192u
#define DEFAULT_AREA_SIZE (64ull << 20)
#define DEFAULT_RQ_ENTRIES 4096u
/* The refill ring header is 64 bytes before Linux 7.3 and 128 since. */
#define RQ_HEADER_RESERVE 128u

#define EXIT_UNAVAILABLE 2

/* user_data: request kind in the top byte, connection index below. */
#define KIND_SHIFT 56
enum kind { KIND_ACCEPT = 1, KIND_RECV = 2, KIND_CANCEL = 3 };


static struct {
    enum scenario scenario;
    long connections;
    size_t request_size;
    size_t response_size;
    uint64_t area_size;
    uint32_t rq_entries;
    bool verbose;
} opt;

static struct {
    int fd;
    bool mixed;             /* CQE_MIXED ring (else CQE32) */
    uint32_t cqe_stride;
    char *map;
    size_t map_size;
    struct iouz_sqe *sqes;
    size_t sqes_size;
    uint32_t *sq_head, *sq_tail, *sq_flags;
    uint32_t sq_mask, sq_entries;
    uint32_t *cq_head, *cq_tail;
    uint32_t cq_mask;
    char *cqes;
    uint32_t local_sq_tail;
    uint32_t submitted;
} ring = { .fd = -1 };

static struct {
    uint32_t id;
    char *area;
    char *region;
    size_t region_size;
    uint32_t *rq_head, *rq_tail;
    struct iouz_zcrx_rqe *rqes;
    uint32_t rq_entries, rq_mask;
    uint32_t local_rq_tail;
    uint32_t unpublished;   /* RQEs written since the last tail store */
} zcrx;

struct conn {
    int fd;
    size_t partial;         /* rr: bytes of the current request so far */
};

static struct conn *conns;
static long accepted, finished;
static bool accept_armed;
static long *rearm;         /* connections whose RECV_ZC ended and must be re-armed */
static long rearm_count;
static unsigned char *response;

static struct {
    unsigned long long bytes, chunks;
    unsigned long long enters, flushes, rearm_enospc, rearm_enomem, rearm_other, accept_rearms;
} stats;

static bool window_open;
static double window_start;
static struct rusage usage_start;
static long rss_mid_kb = -1;

static void unavailable(const char *fmt, ...)
{
    va_list ap;
    struct utsname uts;
    va_start(ap, fmt);
    fputs("zcrx_receiver: ", stderr);
    vfprintf(stderr, fmt, ap);
    if (uname(&uts) == 0)
        fprintf(stderr, " (running Linux %s)", uts.release);
    fputc('\n', stderr);
    va_end(ap);
    exit(EXIT_UNAVAILABLE);
}

static void usage(void)
{
    fputs("usage: zcrx_receiver --scenario {bulk,rr,short} --connections N\n"
          "                     [--request-size K --response-size R] [--buffer-size S]\n"
          "                     [--area-size A] [--rq-entries E] [--verbose]\n",
          stderr);
    exit(1);
}

static size_t page_align(size_t n)
{
    return (n + PAGE - 1) & ~(size_t)(PAGE - 1);
}

static uint32_t round_up_pow2(uint32_t n)
{
    uint32_t p = 1;
    while (p < n)
        p <<= 1;
    return p;
}

/* ---- ring ----------------------------------------------------------------- */

static void setup_ring(void)
{
    /* zcrx needs DEFER_TASKRUN (hence SINGLE_ISSUER) and 32-byte completions;
     * CQE_MIXED (6.18+) keeps the ordinary completions at 16 bytes, CQE32 is
     * the fallback for kernels that lack it. */
    const uint32_t base = IOUZ_SETUP_SINGLE_ISSUER | IOUZ_SETUP_DEFER_TASKRUN |
                          IOUZ_SETUP_TASKRUN_FLAG | IOUZ_SETUP_SUBMIT_ALL |
                          IOUZ_SETUP_CQSIZE | IOUZ_SETUP_CLAMP | IOUZ_SETUP_NO_SQARRAY;
    const uint32_t ladder[2] = { base | IOUZ_SETUP_CQE_MIXED, base | IOUZ_SETUP_CQE32 };
    struct iouz_params p;
    int fd = -EINVAL;
    for (int i = 0; i < 2 && fd == -EINVAL; i++) {
        memset(&p, 0, sizeof(p));
        p.flags = ladder[i];
        p.cq_entries = CQ_ENTRIES;
        fd = iouz_setup(SQ_ENTRIES, &p);
    }
    if (fd < 0)
        unavailable("io_uring is not available: io_uring_setup: %s", strerror(-fd));
    if (!(p.features & IOUZ_FEAT_SINGLE_MMAP))
        unavailable("io_uring without a single SQ/CQ mapping (Linux < 5.4)");
    ring.fd = fd;
    ring.mixed = (p.flags & IOUZ_SETUP_CQE_MIXED) != 0;
    ring.cqe_stride = ring.mixed ? 16 : 32;

    /* NO_SQARRAY: the SQ ring has no index array, slot = tail & mask. */
    size_t cq_size = p.cq_off.cqes + (size_t)p.cq_entries * ring.cqe_stride;
    ring.map_size = cq_size;
    ring.map = mmap(NULL, ring.map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                    fd, IOUZ_OFF_SQ_RING);
    if (ring.map == MAP_FAILED)
        die("mapping the io_uring rings: %s", strerror(errno));
    ring.sqes_size = (size_t)p.sq_entries * sizeof(struct iouz_sqe);
    ring.sqes = mmap(NULL, ring.sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     fd, IOUZ_OFF_SQES);
    if (ring.sqes == MAP_FAILED)
        die("mapping the io_uring SQEs: %s", strerror(errno));
    ring.sq_head = (uint32_t *)(ring.map + p.sq_off.head);
    ring.sq_tail = (uint32_t *)(ring.map + p.sq_off.tail);
    ring.sq_flags = (uint32_t *)(ring.map + p.sq_off.flags);
    ring.sq_mask = *(uint32_t *)(ring.map + p.sq_off.ring_mask);
    ring.sq_entries = p.sq_entries;
    ring.cq_head = (uint32_t *)(ring.map + p.cq_off.head);
    ring.cq_tail = (uint32_t *)(ring.map + p.cq_off.tail);
    ring.cq_mask = *(uint32_t *)(ring.map + p.cq_off.ring_mask);
    ring.cqes = ring.map + p.cq_off.cqes;
    ring.local_sq_tail = *ring.sq_tail;
    ring.submitted = ring.local_sq_tail;
}

/* Publishes queued SQEs and enters the kernel; with `getevents` also runs the
 * deferred task work (which is what turns received data into completions)
 * and waits for `wait_nr` CQEs. */
static void enter(unsigned wait_nr, bool getevents)
{
    uint32_t to_submit = ring.local_sq_tail - ring.submitted;
    if (to_submit == 0 && !getevents)
        return;
    iouz_store_release(ring.sq_tail, ring.local_sq_tail);
    int ret = iouz_enter(ring.fd, to_submit, wait_nr, getevents ? IOUZ_ENTER_GETEVENTS : 0,
                         NULL, 0);
    stats.enters++;
    if (ret < 0) {
        /* EBUSY/EAGAIN: the CQ has overflowed entries; reaping makes room
         * and the unsubmitted SQEs go in on the next call. */
        if (ret == -EINTR || ret == -EBUSY || ret == -EAGAIN)
            return;
        die("io_uring_enter: %s", strerror(-ret));
    }
    ring.submitted += (uint32_t)ret;
}

static struct iouz_sqe *get_sqe(void)
{
    if (ring.local_sq_tail - iouz_load_acquire(ring.sq_head) >= ring.sq_entries) {
        enter(0, false);
        if (ring.local_sq_tail - iouz_load_acquire(ring.sq_head) >= ring.sq_entries)
            die("the submission queue stays full");
    }
    struct iouz_sqe *sqe = &ring.sqes[ring.local_sq_tail & ring.sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    ring.local_sq_tail++;
    return sqe;
}

static uint64_t tag(enum kind kind, long index)
{
    return ((uint64_t)kind << KIND_SHIFT) | (uint64_t)index;
}

/* ---- zcrx ----------------------------------------------------------------- */

static void register_zcrx(void)
{
    /* Pages populated now so the first receives do not fault them in, and
     * kept small-page: copy mode hands out page-sized chunks anyway. */
    zcrx.area = mmap(NULL, opt.area_size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (zcrx.area == MAP_FAILED)
        die("mapping a %llu-byte area: %s", (unsigned long long)opt.area_size, strerror(errno));
    madvise(zcrx.area, opt.area_size, MADV_NOHUGEPAGE);

    uint32_t entries = round_up_pow2(opt.rq_entries);
    zcrx.region_size = page_align(RQ_HEADER_RESERVE + (size_t)entries * sizeof(struct iouz_zcrx_rqe));
    zcrx.region = mmap(NULL, zcrx.region_size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (zcrx.region == MAP_FAILED)
        die("mapping the refill ring: %s", strerror(errno));

    struct iouz_zcrx_area_reg area = {
        .addr = (uint64_t)(uintptr_t)zcrx.area,
        .len = opt.area_size,
    };
    struct iouz_region_desc region = {
        .user_addr = (uint64_t)(uintptr_t)zcrx.region,
        .size = zcrx.region_size,
        .flags = IOUZ_MEM_REGION_TYPE_USER,
    };
    struct iouz_zcrx_ifq_reg reg = {
        .if_idx = 0,            /* NODEV: no interface, no queue */
        .if_rxq = 0,
        .rq_entries = entries,
        .flags = IOUZ_ZCRX_REG_NODEV,
        .area_ptr = (uint64_t)(uintptr_t)&area,
        .region_ptr = (uint64_t)(uintptr_t)&region,
    };
    int ret = iouz_register(ring.fd, IOUZ_REGISTER_ZCRX_IFQ, &reg, 1);
    if (ret < 0) {
        const char *hint = "";
        if (ret == -EPERM)
            hint = " (not running with CAP_NET_ADMIN)";
        else if (ret == -EINVAL)
            hint = " (most likely a kernel without ZCRX_REG_NODEV)";
        else if (ret == -EOPNOTSUPP)
            hint = " (kernel built without CONFIG_IO_URING_ZCRX)";
        else if (ret == -ENOMEM)
            hint = " (RLIMIT_MEMLOCK too low for the area without CAP_IPC_LOCK?)";
        unavailable("RECV_ZC copy mode needs Linux >= 7.1 and CAP_NET_ADMIN: "
                    "registering a ZCRX_REG_NODEV queue failed: %s%s", strerror(-ret), hint);
    }
    zcrx.id = reg.zcrx_id;
    zcrx.rq_entries = reg.rq_entries;
    zcrx.rq_mask = reg.rq_entries - 1;
    zcrx.rq_head = (uint32_t *)(zcrx.region + reg.offsets.head);
    zcrx.rq_tail = (uint32_t *)(zcrx.region + reg.offsets.tail);
    zcrx.rqes = (struct iouz_zcrx_rqe *)(zcrx.region + reg.offsets.rqes);
    zcrx.local_rq_tail = *zcrx.rq_tail;
}

/* In copy mode nothing drains the refill ring on its own (there is no NIC
 * page pool asking for buffers): ZCRX_CTRL_FLUSH_RQ makes the kernel take the
 * returned chunks back into the area's free list now. */
static void flush_refill_ring(void)
{
    struct iouz_zcrx_ctrl ctrl;
    memset(&ctrl, 0, sizeof(ctrl));
    ctrl.zcrx_id = zcrx.id;
    ctrl.op = IOUZ_ZCRX_CTRL_FLUSH_RQ;
    int ret = iouz_register(ring.fd, IOUZ_REGISTER_ZCRX_CTRL, &ctrl, 0);
    if (ret < 0)
        die("ZCRX_CTRL_FLUSH_RQ: %s", strerror(-ret));
    stats.flushes++;
}

static void publish_returns(void)
{
    if (zcrx.unpublished == 0)
        return;
    iouz_store_release(zcrx.rq_tail, zcrx.local_rq_tail);
    zcrx.unpublished = 0;
    flush_refill_ring();
}

/* One refill entry per data completion: the kernel counts a user reference
 * per CQE, not per chunk.  The CQE offset already carries the area token. */
static void return_buffer(uint64_t off, int32_t len)
{
    if (zcrx.local_rq_tail - iouz_load_acquire(zcrx.rq_head) >= zcrx.rq_entries) {
        publish_returns();
        if (zcrx.local_rq_tail - iouz_load_acquire(zcrx.rq_head) >= zcrx.rq_entries)
            die("the refill ring stays full after a flush");
    }
    struct iouz_zcrx_rqe *rqe = &zcrx.rqes[zcrx.local_rq_tail & zcrx.rq_mask];
    rqe->off = off;
    rqe->len = (uint32_t)len;
    rqe->pad = 0;
    zcrx.local_rq_tail++;
    zcrx.unpublished++;
}

/* ---- requests ------------------------------------------------------------- */

static void arm_accept(int listen_fd)
{
    struct iouz_sqe *sqe = get_sqe();
    sqe->opcode = IOUZ_OP_ACCEPT;
    sqe->fd = listen_fd;
    sqe->ioprio = IOUZ_ACCEPT_MULTISHOT;
    sqe->op_flags = SOCK_CLOEXEC;
    sqe->user_data = tag(KIND_ACCEPT, 0);
    accept_armed = true;
}

static void cancel_accept(void)
{
    struct iouz_sqe *sqe = get_sqe();
    sqe->opcode = IOUZ_OP_ASYNC_CANCEL;
    sqe->fd = -1;
    sqe->addr = tag(KIND_ACCEPT, 0);
    sqe->user_data = tag(KIND_CANCEL, 0);
}

static void arm_recv(long index)
{
    struct iouz_sqe *sqe = get_sqe();
    sqe->opcode = IOUZ_OP_RECV_ZC;
    sqe->fd = conns[index].fd;
    sqe->ioprio = IOUZ_RECV_MULTISHOT;
    sqe->file_index = zcrx.id;     /* zcrx_ifq_idx */
    sqe->len = 0;                  /* no byte budget: a 0 result means EOF */
    sqe->user_data = tag(KIND_RECV, index);
}

static void open_window(void)
{
    window_open = true;
    window_start = now_seconds();
    getrusage(RUSAGE_SELF, &usage_start);
}

static void on_accept(int32_t res, uint32_t flags, int listen_fd)
{
    if (!(flags & IOUZ_CQE_F_MORE))
        accept_armed = false;
    if (res < 0) {
        if (res == -ECANCELED && accepted >= opt.connections)
            return;
        die("accept: %s", strerror(-res));
    }
    if (accepted >= opt.connections)
        die("more connections arrived than --connections %ld", opt.connections);
    if (!window_open)
        open_window();
    long index = accepted++;
    conns[index].fd = res;
    conns[index].partial = 0;
    if (opt.scenario == RR) {
        int one = 1;
        if (setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
            die("setsockopt TCP_NODELAY: %s", strerror(errno));
    }
    arm_recv(index);
    if (accepted == opt.connections) {
        if (accept_armed)
            cancel_accept();
    } else if (!accept_armed) {
        /* A full CQ ends a multishot accept; the connection it carried is
         * the one handled above. */
        stats.accept_rearms++;
        arm_accept(listen_fd);
    }
}

static void on_recv(long index, int32_t res, uint32_t flags, uint64_t extra)
{
    struct conn *c = &conns[index];
    if (res > 0) {
        stats.bytes += (unsigned long long)res;
        stats.chunks++;
        return_buffer(extra, res);
        if (opt.scenario == RR) {
            c->partial += (size_t)res;
            while (c->partial >= opt.request_size) {
                c->partial -= opt.request_size;
                send_all(c->fd, response, opt.response_size);
            }
        }
        if (!(flags & IOUZ_CQE_F_MORE)) {
            /* Not expected (final RECV_ZC completions carry no data), but
             * the request is over either way: start a new one. */
            stats.rearm_other++;
            rearm[rearm_count++] = index;
        }
        return;
    }
    if (flags & IOUZ_CQE_F_MORE)
        return;
    if (res == 0) {
        if (c->partial != 0)
            die("EOF in the middle of a request (%zu of %zu bytes)", c->partial,
                opt.request_size);
        if (opt.scenario == BULK && rss_mid_kb < 0) {
            struct rusage ru;
            getrusage(RUSAGE_SELF, &ru);
            rss_mid_kb = ru.ru_maxrss;
        }
        close(c->fd);
        c->fd = -1;
        finished++;
        return;
    }
    if (res == -ENOSPC) {
        /* The CQ was full: nothing past the reported data left the socket. */
        stats.rearm_enospc++;
        rearm[rearm_count++] = index;
        return;
    }
    if (res == -ENOMEM) {
        /* No free chunk in the area: the data stays queued in the socket and
         * the request is re-armed after this batch's returns are flushed. */
        stats.rearm_enomem++;
        rearm[rearm_count++] = index;
        return;
    }
    die("RECV_ZC on connection %ld: %s", index, strerror(-res));
}

/* Reaps every visible CQE, then releases the slots with one head store. */
static void reap(int listen_fd)
{
    uint32_t head = *ring.cq_head;
    uint32_t tail = iouz_load_acquire(ring.cq_tail);
    while (head != tail) {
        const struct iouz_cqe *cqe =
            (const struct iouz_cqe *)(ring.cqes + (size_t)(head & ring.cq_mask) * ring.cqe_stride);
        uint32_t flags = cqe->flags;
        uint64_t extra = 0;
        if (ring.mixed) {
            if (flags & IOUZ_CQE_F_SKIP) {
                /* Filler: a 32-byte CQE never wraps around the ring end. */
                head++;
                continue;
            }
            if (flags & IOUZ_CQE_F_32) {
                extra = ((const struct iouz_zcrx_cqe *)(cqe + 1))->off;
                head += 2;
            } else {
                head += 1;
            }
        } else {
            extra = ((const struct iouz_zcrx_cqe *)(cqe + 1))->off;
            head += 1;
        }
        uint64_t user_data = cqe->user_data;
        int32_t res = cqe->res;
        long index = (long)(user_data & ((1ull << KIND_SHIFT) - 1));
        switch ((enum kind)(user_data >> KIND_SHIFT)) {
        case KIND_ACCEPT:
            on_accept(res, flags, listen_fd);
            break;
        case KIND_RECV:
            on_recv(index, res, flags, extra);
            break;
        case KIND_CANCEL:
            break;
        default:
            die("completion with unknown user_data %#llx", (unsigned long long)user_data);
        }
    }
    iouz_store_release(ring.cq_head, head);
}

/* ---- main ----------------------------------------------------------------- */

static void parse_args(int argc, char **argv)
{
    const char *scenario = NULL;
    opt.connections = -1;
    opt.area_size = DEFAULT_AREA_SIZE;
    opt.rq_entries = DEFAULT_RQ_ENTRIES;
    for (int i = 1; i < argc; i++) {
        const char *name = argv[i];
        if (strcmp(name, "-h") == 0 || strcmp(name, "--help") == 0)
            usage();
        if (strcmp(name, "--verbose") == 0) {
            opt.verbose = true;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "zcrx_receiver: %s needs a value\n", name);
            usage();
        }
        const char *value = argv[++i];
        if (receiver_option(name, value, &scenario, &opt.connections, &opt.request_size,
                            &opt.response_size))
            continue;
        if (strcmp(name, "--buffer-size") == 0) {
            parse_count(name, value);      /* accepted for CLI parity, unused */
        } else if (strcmp(name, "--area-size") == 0) {
            unsigned long long n = parse_count(name, value);
            if (n < PAGE || n % PAGE || n >= (1ull << 32))
                die("--area-size must be a multiple of %u below 4 GiB", PAGE);
            opt.area_size = n;
        } else if (strcmp(name, "--rq-entries") == 0) {
            opt.rq_entries = (uint32_t)parse_in_range(name, value, 1, IOUZ_RQ_MAX_ENTRIES);
        } else {
            fprintf(stderr, "zcrx_receiver: unknown option %s\n", name);
            usage();
        }
    }
    if (scenario == NULL || opt.connections < 0)
        usage();
    opt.scenario = receiver_scenario(scenario, opt.request_size, opt.response_size,
                                     opt.connections);
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);

    /* Everything that can say "not available" happens before READY, so the
     * caller never starts a sender against a receiver that cannot run. */
    setup_ring();
    register_zcrx();

    conns = calloc((size_t)opt.connections, sizeof(*conns));
    rearm = calloc((size_t)opt.connections, sizeof(*rearm));
    if (conns == NULL || rearm == NULL)
        die("out of memory for %ld connections", opt.connections);
    if (opt.scenario == RR) {
        if (posix_memalign((void **)&response, PAGE, opt.response_size))
            die("out of memory for the response");
        memset(response, 'r', opt.response_size);
    }

    int port;
    int listen_fd = listen_loopback(&port);
    printf("READY %d\n", port);
    fflush(stdout);

    arm_accept(listen_fd);
    while (finished < opt.connections) {
        bool overflow = (iouz_load_acquire(ring.sq_flags) & IOUZ_SQ_CQ_OVERFLOW) != 0;
        if (rearm_count > 0 && !overflow) {
            /* Re-arm only once overflowed completions are back in the ring,
             * otherwise the new request would hit -ENOSPC straight away. */
            for (long i = 0; i < rearm_count; i++)
                arm_recv(rearm[i]);
            rearm_count = 0;
        }
        /* Never sleep while overflowed CQEs or pending re-arms wait for room. */
        enter(overflow || rearm_count > 0 ? 0 : 1, true);
        reap(listen_fd);
        publish_returns();
    }
    double seconds = now_seconds() - window_start;
    struct rusage usage_end;
    getrusage(RUSAGE_SELF, &usage_end);

    printf("{\"bytes\": %llu, \"chunks\": %llu, \"connections\": %ld, \"seconds\": %.6f, "
           "\"cpu_user\": %.6f, \"cpu_sys\": %.6f, \"maxrss_kb\": %ld, ",
           stats.bytes, stats.chunks, opt.connections, seconds,
           timeval_seconds(usage_end.ru_utime) - timeval_seconds(usage_start.ru_utime),
           timeval_seconds(usage_end.ru_stime) - timeval_seconds(usage_start.ru_stime),
           usage_end.ru_maxrss);
    if (rss_mid_kb >= 0)
        printf("\"rss_mid_kb\": %ld}\n", rss_mid_kb);
    else
        printf("\"rss_mid_kb\": null}\n");
    if (fflush(stdout) != 0)
        die("writing the result: %s", strerror(errno));
    if (opt.verbose)
        fprintf(stderr,
                "zcrx_receiver: %s ring, zcrx id %u, rq_entries %u, enters %llu, flushes %llu, "
                "re-arms: enospc %llu enomem %llu other %llu, accept re-arms %llu\n",
                ring.mixed ? "CQE_MIXED" : "CQE32", zcrx.id, zcrx.rq_entries, stats.enters,
                stats.flushes, stats.rearm_enospc, stats.rearm_enomem, stats.rearm_other,
                stats.accept_rearms);

    /* Closing the ring cancels the leftover accept and releases the ifq. */
    close(listen_fd);
    close(ring.fd);
    return 0;
}
