/*
 * rr_wakeups: one request/response connection served three ways, to show
 * what each way of learning that a request arrived costs in the kernel,
 * with no Python in the picture.
 *
 *   rr_wakeups --wait {epoll-recv,ring,epoll-ring-recv}
 *              --scenario rr --connections 1 --request-size K --response-size R
 *
 *   epoll-recv       what uvloop does: epoll_wait on the socket, then recv().
 *   ring             what iouzcrx's bufring mode does: a multishot RECV from
 *                    a buffer ring on an io_uring without DEFER_TASKRUN, and
 *                    epoll_wait on the ring's fd.  The kernel runs the
 *                    receive as task work of this thread when data arrives,
 *                    which interrupts the epoll_wait (EINTR) and posts the
 *                    completion; the next epoll_wait finds the ring readable.
 *   epoll-ring-recv  epoll_wait on the socket, then a one-shot RECV from the
 *                    buffer ring, submitted with io_uring_enter: the kernel
 *                    issues it at once and the completion is posted before
 *                    the call returns.  No task work.
 *
 * After every whole K-byte request an R-byte send() answers, as in
 * recv_receiver.  Prints "READY <port>", then recv_receiver's JSON line;
 * the window runs from the accept to the peer's EOF.  Every variant makes
 * its figures with the same buffers: 16 of 64 KiB.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../../iouzcrx/_abi.h"

#define PROGRAM "rr_wakeups"
#include "bench.h"

#define BUFFERS 16u             /* a power of two: the buffer ring's size */
#define BUFFER_SIZE (64u << 10)
#define BUFFER_GROUP 1u
#define RING_ENTRIES 64u

enum wait_kind { EPOLL_RECV, RING, EPOLL_RING_RECV };

static struct {
    enum wait_kind wait;
    size_t request_size, response_size;
} opt;

static struct {
    int fd;
    struct iouz_sqe *sqes;
    uint32_t *sq_tail, sq_mask, local_tail;
    uint32_t *cq_head, *cq_tail, cq_mask;
    struct iouz_cqe *cqes;
    struct iouz_buf *bufs;      /* the buffer ring's entries */
    uint16_t bufs_tail;
    unsigned char *area;        /* BUFFERS * BUFFER_SIZE */
} ring = { .fd = -1 };

static int sock;
static unsigned char *response;
static size_t partial;          /* bytes of the current request so far */
static unsigned long long bytes, chunks;

static void usage(void)
{
    fputs("usage: rr_wakeups --wait {epoll-recv,ring,epoll-ring-recv} --scenario rr "
          "--connections 1 --request-size K --response-size R\n", stderr);
    exit(1);
}

/* Count what arrived and answer every request it completes. */
static void received(size_t n)
{
    bytes += n;
    chunks++;
    partial += n;
    while (partial >= opt.request_size) {
        partial -= opt.request_size;
        send_all(sock, response, opt.response_size);
    }
}

/* ---- the ring ------------------------------------------------------------- */

static void *map_ring(size_t size, uint64_t offset)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring.fd,
                   (off_t)offset);
    if (p == MAP_FAILED)
        die("mmap of the io_uring: %s", strerror(errno));
    return p;
}

static void ring_setup(void)
{
    struct iouz_params p;
    memset(&p, 0, sizeof(p));
    /* As iouzcrx's bufring ring: COOP_TASKRUN, no DEFER_TASKRUN. */
    p.flags = IOUZ_SETUP_SINGLE_ISSUER | IOUZ_SETUP_SUBMIT_ALL | IOUZ_SETUP_COOP_TASKRUN;
    ring.fd = (int)syscall(__NR_io_uring_setup, RING_ENTRIES, &p);
    if (ring.fd < 0)
        die("io_uring_setup: %s", strerror(errno));
    if (!(p.features & IOUZ_FEAT_SINGLE_MMAP))
        die("this kernel maps the SQ and CQ rings apart: too old");
    size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct iouz_cqe);
    char *rings = map_ring(sq_size > cq_size ? sq_size : cq_size, IOUZ_OFF_SQ_RING);
    ring.sqes = map_ring(p.sq_entries * sizeof(struct iouz_sqe), IOUZ_OFF_SQES);
    ring.sq_tail = (uint32_t *)(rings + p.sq_off.tail);
    ring.sq_mask = *(uint32_t *)(rings + p.sq_off.ring_mask);
    ring.local_tail = *ring.sq_tail;
    /* Slot i of the SQ array names SQE i, for good. */
    uint32_t *array = (uint32_t *)(rings + p.sq_off.array);
    for (uint32_t i = 0; i < p.sq_entries; i++)
        array[i] = i;
    ring.cq_head = (uint32_t *)(rings + p.cq_off.head);
    ring.cq_tail = (uint32_t *)(rings + p.cq_off.tail);
    ring.cq_mask = *(uint32_t *)(rings + p.cq_off.ring_mask);
    ring.cqes = (struct iouz_cqe *)(rings + p.cq_off.cqes);

    size_t bufs_size = BUFFERS * sizeof(struct iouz_buf);
    ring.bufs = mmap(NULL, bufs_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ring.area = mmap(NULL, (size_t)BUFFERS * BUFFER_SIZE, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (ring.bufs == MAP_FAILED || ring.area == MAP_FAILED)
        die("mmap of the buffers: %s", strerror(errno));
    struct iouz_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)ring.bufs;
    reg.ring_entries = BUFFERS;
    reg.bgid = BUFFER_GROUP;
    if (syscall(__NR_io_uring_register, ring.fd, IOUZ_REGISTER_PBUF_RING, &reg, 1) < 0)
        die("registering the buffer ring: %s", strerror(errno));
    for (uint16_t bid = 0; bid < BUFFERS; bid++) {
        struct iouz_buf *b = &ring.bufs[bid];
        b->addr = (uint64_t)(uintptr_t)(ring.area + (size_t)bid * BUFFER_SIZE);
        b->len = BUFFER_SIZE;
        b->bid = bid;
    }
    ring.bufs_tail = BUFFERS;
    /* The tail shares its slot with the first entry's resv field. */
    __atomic_store_n(&ring.bufs[0].resv, ring.bufs_tail, __ATOMIC_RELEASE);
}

static void give_back(uint16_t bid)
{
    struct iouz_buf *b = &ring.bufs[ring.bufs_tail & (BUFFERS - 1)];
    b->addr = (uint64_t)(uintptr_t)(ring.area + (size_t)bid * BUFFER_SIZE);
    b->len = BUFFER_SIZE;
    b->bid = bid;
    ring.bufs_tail++;
    __atomic_store_n(&ring.bufs[0].resv, ring.bufs_tail, __ATOMIC_RELEASE);
}

/* Queue a RECV from the buffer ring: multishot, or one non-blocking try. */
static void queue_recv(bool multishot)
{
    struct iouz_sqe *sqe = &ring.sqes[ring.local_tail & ring.sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = IOUZ_OP_RECV;
    sqe->fd = sock;
    sqe->flags = IOUZ_SQE_BUFFER_SELECT;
    sqe->buf_group = BUFFER_GROUP;
    if (multishot)
        sqe->ioprio = IOUZ_RECV_MULTISHOT;
    else
        sqe->op_flags = MSG_DONTWAIT;   /* EAGAIN as a completion, never a poll */
    ring.local_tail++;
    __atomic_store_n(ring.sq_tail, ring.local_tail, __ATOMIC_RELEASE);
}

static void submit(void)
{
    for (;;) {
        long ret = syscall(__NR_io_uring_enter, ring.fd, 1, 0, 0, NULL, 0);
        if (ret >= 0)
            return;
        if (errno != EINTR)
            die("io_uring_enter: %s", strerror(errno));
    }
}

/* Handle every posted completion; false once the peer's EOF came.  *rearm
 * says whether a multishot receive ended and must be queued again. */
static bool reap(bool *rearm)
{
    uint32_t head = *ring.cq_head;
    uint32_t tail = __atomic_load_n(ring.cq_tail, __ATOMIC_ACQUIRE);
    bool open = true;
    for (; head != tail; head++) {
        struct iouz_cqe *cqe = &ring.cqes[head & ring.cq_mask];
        if (cqe->res > 0) {
            uint16_t bid = (uint16_t)(cqe->flags >> IOUZ_CQE_BUFFER_SHIFT);
            received((size_t)cqe->res);
            give_back(bid);
        } else if (cqe->res == 0) {
            open = false;
        } else if (cqe->res != -EAGAIN && cqe->res != -ENOBUFS) {
            die("recv completion: %s", strerror(-cqe->res));
        }
        if (!(cqe->flags & IOUZ_CQE_F_MORE))
            *rearm = true;
    }
    __atomic_store_n(ring.cq_head, head, __ATOMIC_RELEASE);
    return open;
}

/* ---- the three ways ------------------------------------------------------- */

static int epoll_on(int fd)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll: %s", strerror(errno));
    return ep;
}

static void wait_for(int ep)
{
    struct epoll_event ev;
    while (epoll_wait(ep, &ev, 1, -1) < 0) {
        if (errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
    }
}

static void serve_epoll_recv(void)
{
    unsigned char *buf = malloc(BUFFER_SIZE);
    int ep = epoll_on(sock);
    for (;;) {
        wait_for(ep);
        ssize_t n = recv(sock, buf, BUFFER_SIZE, MSG_DONTWAIT);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            die("recv: %s", strerror(errno));
        }
        received((size_t)n);
    }
    close(ep);
    free(buf);
}

static void serve_ring(void)
{
    ring_setup();
    int ep = epoll_on(ring.fd);
    queue_recv(true);
    submit();
    for (;;) {
        wait_for(ep);
        bool rearm = false;
        if (!reap(&rearm))
            break;
        if (rearm) {
            queue_recv(true);
            submit();
        }
    }
    close(ep);
}

static void serve_epoll_ring_recv(void)
{
    ring_setup();
    int ep = epoll_on(sock);
    for (;;) {
        wait_for(ep);
        bool rearm = false;
        queue_recv(false);
        submit();
        if (!reap(&rearm))
            break;
    }
    close(ep);
}

/* ---- main ----------------------------------------------------------------- */

static void parse_args(int argc, char **argv)
{
    const char *scenario = NULL, *wait = NULL;
    long connections = -1;
    for (int i = 1; i < argc; i += 2) {
        const char *name = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (value == NULL)
            usage();
        if (strcmp(name, "--wait") == 0)
            wait = value;
        else if (!receiver_option(name, value, &scenario, &connections, &opt.request_size,
                                  &opt.response_size))
            usage();
    }
    if (scenario == NULL || wait == NULL)
        usage();
    if (receiver_scenario(scenario, opt.request_size, opt.response_size, connections) != RR)
        die("only the rr scenario");
    if (strcmp(wait, "epoll-recv") == 0)
        opt.wait = EPOLL_RECV;
    else if (strcmp(wait, "ring") == 0)
        opt.wait = RING;
    else if (strcmp(wait, "epoll-ring-recv") == 0)
        opt.wait = EPOLL_RING_RECV;
    else
        usage();
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    sock = accept_one(listen_announced());
    int one = 1;
    if (setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
        die("setsockopt TCP_NODELAY: %s", strerror(errno));
    response = malloc(opt.response_size);
    memset(response, 'r', opt.response_size);

    struct rusage before, after;
    double start = now_seconds();
    getrusage(RUSAGE_SELF, &before);
    if (opt.wait == EPOLL_RECV)
        serve_epoll_recv();
    else if (opt.wait == RING)
        serve_ring();
    else
        serve_epoll_ring_recv();
    double seconds = now_seconds() - start;
    getrusage(RUSAGE_SELF, &after);
    if (partial != 0)
        die("EOF in the middle of a request (%zu of %zu bytes)", partial, opt.request_size);
    printf("{\"bytes\": %llu, \"chunks\": %llu, \"connections\": 1, \"seconds\": %.6f, "
           "\"cpu_user\": %.6f, \"cpu_sys\": %.6f, \"maxrss_kb\": %ld, \"rss_mid_kb\": null}\n",
           bytes, chunks, seconds,
           timeval_seconds(after.ru_utime) - timeval_seconds(before.ru_utime),
           timeval_seconds(after.ru_stime) - timeval_seconds(before.ru_stime),
           after.ru_maxrss);
    return fflush(stdout) == 0 ? 0 : 1;
}
