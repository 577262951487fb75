/*
 * recv_receiver: the plain recv() reference receiver, one thread per connection.
 *
 *   recv_receiver --scenario {bulk,rr,short} --connections N
 *                 [--request-size K --response-size R] [--buffer-size S]
 *                 [--threads {per-connection,one}]
 *
 * Listens on 127.0.0.1 (kernel-chosen port), prints "READY <port>" and then:
 *   bulk   accepts N connections, each served by its own thread doing recv()
 *          into a page-aligned S-byte buffer (default 256 KiB) until EOF;
 *          with --threads one, a single thread serves them all through
 *          epoll, reading each ready socket until it would block: what one
 *          event-loop thread can reach with recv();
 *   rr     accepts one connection (TCP_NODELAY) and answers every whole
 *          K-byte request with an R-byte response, until EOF;
 *   short  accepts N connections as they come, a thread each (recv to EOF,
 *          close), and ends when all N are done (with --threads one, all on
 *          the epoll thread).
 * Every connection is closed by us right after its EOF.
 *
 * The window opens at the first successful accept() and closes when the last
 * connection is done.  One JSON line goes to stdout at the end:
 *   {"bytes", "chunks" (recv() calls that returned > 0), "connections",
 *    "seconds", "cpu_user", "cpu_sys" (getrusage(RUSAGE_SELF) over the window),
 *    "maxrss_kb", "rss_mid_kb" (ru_maxrss when the first connection reached
 *    EOF, bulk only; null otherwise)}
 * Errors go to stderr with exit code 1.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROGRAM "recv_receiver"
#include "bench.h"

#define PAGE 4096
#define DEFAULT_BUFFER_SIZE (256u * 1024u)


static struct {
    enum scenario scenario;
    long connections;
    size_t request_size;
    size_t response_size;
    size_t buffer_size;
    int one_thread;     /* --threads one */
} opt;

/* Totals, added by each connection thread once it is done. */
static atomic_ullong total_bytes;
static atomic_ullong total_chunks;
static atomic_long rss_mid_kb = -1;     /* -1: not sampled */

/* Completion count: threads are detached, the main thread waits here. */
static pthread_mutex_t done_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cond = PTHREAD_COND_INITIALIZER;
static long done_count;

static void usage(void)
{
    fputs("usage: recv_receiver --scenario {bulk,rr,short} --connections N\n"
          "                     [--request-size K --response-size R] [--buffer-size S]\n"
          "                     [--threads {per-connection,one}]\n",
          stderr);
    exit(1);
}

static long maxrss_kb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

static void *alloc_buffer(size_t size)
{
    void *p;
    if (posix_memalign(&p, PAGE, size))
        die("out of memory for a %zu-byte buffer", size);
    return p;
}

/* ---- bulk and short: one detached thread per connection -------------------- */

static void *drain_connection(void *arg)
{
    int fd = (int)(intptr_t)arg;
    unsigned char *buf = alloc_buffer(opt.buffer_size);
    unsigned long long bytes = 0, chunks = 0;
    for (;;) {
        ssize_t n = recv(fd, buf, opt.buffer_size, 0);
        if (n > 0) {
            bytes += (unsigned long long)n;
            chunks++;
        } else if (n == 0) {
            break;
        } else if (errno != EINTR) {
            die("recv: %s", strerror(errno));
        }
    }
    if (opt.scenario == BULK) {
        /* The first connection to finish samples the peak RSS mid-run,
         * while every other connection still holds its buffer. */
        long unset = -1;
        long rss = maxrss_kb();
        atomic_compare_exchange_strong(&rss_mid_kb, &unset, rss);
    }
    close(fd);
    free(buf);
    atomic_fetch_add_explicit(&total_bytes, bytes, memory_order_relaxed);
    atomic_fetch_add_explicit(&total_chunks, chunks, memory_order_relaxed);
    pthread_mutex_lock(&done_lock);
    done_count++;
    pthread_cond_signal(&done_cond);
    pthread_mutex_unlock(&done_lock);
    return NULL;
}

/* ---- bulk and short on one thread: epoll over every connection ------------- */

static void drain_all_on_one_thread(int listen_fd, double *start, struct rusage *before)
{
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0)
        die("epoll_create1: %s", strerror(errno));
    /* Non-blocking, so that a connection reset between the wake-up and the
     * accept cannot stall every other connection. */
    if (fcntl(listen_fd, F_SETFL, fcntl(listen_fd, F_GETFL) | O_NONBLOCK) < 0)
        die("fcntl: %s", strerror(errno));
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listen_fd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, listen_fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    unsigned char *buf = alloc_buffer(opt.buffer_size);
    unsigned long long bytes = 0, chunks = 0;
    long accepted = 0, done = 0;
    struct epoll_event ready[64];
    while (done < opt.connections) {
        int n = epoll_wait(ep, ready, 64, -1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < n; i++) {
            int fd = ready[i].data.fd;
            if (fd == listen_fd) {
                int conn = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (conn < 0) {
                    /* A connection reset before we got to it is the peer's business. */
                    if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
                        die("accept: %s", strerror(errno));
                    continue;
                }
                if (accepted++ == 0) {
                    *start = now_seconds();
                    getrusage(RUSAGE_SELF, before);
                }
                ev.data.fd = conn;
                if (epoll_ctl(ep, EPOLL_CTL_ADD, conn, &ev) < 0)
                    die("epoll_ctl: %s", strerror(errno));
                if (accepted == opt.connections)
                    epoll_ctl(ep, EPOLL_CTL_DEL, listen_fd, NULL);
                continue;
            }
            ssize_t got;
            while ((got = recv(fd, buf, opt.buffer_size, 0)) > 0) {
                bytes += (unsigned long long)got;
                chunks++;
            }
            if (got == 0) {
                if (done++ == 0 && opt.scenario == BULK)
                    rss_mid_kb = maxrss_kb();
                close(fd);      /* also leaves the epoll set */
            } else if (errno != EAGAIN && errno != EINTR) {
                die("recv: %s", strerror(errno));
            }
        }
    }
    close(ep);
    free(buf);
    total_bytes = bytes;
    total_chunks = chunks;
}

/* ---- rr: request/response on the main thread ------------------------------ */

static void serve_requests(int fd)
{
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
        die("setsockopt TCP_NODELAY: %s", strerror(errno));
    unsigned char *buf = alloc_buffer(opt.buffer_size);
    unsigned char *response = alloc_buffer(opt.response_size);
    memset(response, 'r', opt.response_size);
    unsigned long long bytes = 0, chunks = 0;
    size_t partial = 0;     /* bytes of the request not yet complete */
    for (;;) {
        ssize_t n = recv(fd, buf, opt.buffer_size, 0);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("recv: %s", strerror(errno));
        }
        bytes += (unsigned long long)n;
        chunks++;
        partial += (size_t)n;
        while (partial >= opt.request_size) {
            partial -= opt.request_size;
            send_all(fd, response, opt.response_size);
        }
    }
    if (partial != 0)
        die("EOF in the middle of a request (%zu of %zu bytes)", partial, opt.request_size);
    close(fd);
    free(buf);
    free(response);
    total_bytes = bytes;
    total_chunks = chunks;
}

/* ---- main ----------------------------------------------------------------- */

static void parse_args(int argc, char **argv)
{
    const char *scenario = NULL;
    opt.connections = -1;
    opt.buffer_size = DEFAULT_BUFFER_SIZE;
    for (int i = 1; i < argc; i++) {
        const char *name = argv[i];
        if (strcmp(name, "-h") == 0 || strcmp(name, "--help") == 0)
            usage();
        if (i + 1 >= argc) {
            fprintf(stderr, "recv_receiver: %s needs a value\n", name);
            usage();
        }
        const char *value = argv[++i];
        if (receiver_option(name, value, &scenario, &opt.connections, &opt.request_size,
                            &opt.response_size))
            continue;
        if (strcmp(name, "--buffer-size") == 0) {
            opt.buffer_size = (size_t)parse_in_range(name, value, 1, 1ull << 30);
        } else if (strcmp(name, "--threads") == 0) {
            if (strcmp(value, "one") == 0)
                opt.one_thread = 1;
            else if (strcmp(value, "per-connection") != 0)
                die("--threads is per-connection or one, not %s", value);
        } else {
            fprintf(stderr, "recv_receiver: unknown option %s\n", name);
            usage();
        }
    }
    if (scenario == NULL || opt.connections < 0)
        usage();
    opt.scenario = receiver_scenario(scenario, opt.request_size, opt.response_size,
                                     opt.connections);
    if (opt.one_thread && opt.scenario == RR)
        die("--threads one is for bulk and short (rr has one connection already)");
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    int listen_fd = listen_announced();

    struct rusage before, after;
    double start = 0;
    if (opt.scenario == RR) {
        int fd = accept_one(listen_fd);
        start = now_seconds();
        getrusage(RUSAGE_SELF, &before);
        serve_requests(fd);
    } else if (opt.one_thread) {
        drain_all_on_one_thread(listen_fd, &start, &before);
    } else {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* The receive buffer is on the heap; the stack only needs a frame. */
        pthread_attr_setstacksize(&attr, 128 * 1024);
        for (long i = 0; i < opt.connections; i++) {
            int fd = accept_one(listen_fd);
            if (i == 0) {
                start = now_seconds();
                getrusage(RUSAGE_SELF, &before);
            }
            pthread_t thread;
            int err = pthread_create(&thread, &attr, drain_connection, (void *)(intptr_t)fd);
            if (err)
                die("pthread_create: %s", strerror(err));
        }
        pthread_attr_destroy(&attr);
        pthread_mutex_lock(&done_lock);
        while (done_count < opt.connections)
            pthread_cond_wait(&done_cond, &done_lock);
        pthread_mutex_unlock(&done_lock);
    }
    double seconds = now_seconds() - start;
    getrusage(RUSAGE_SELF, &after);
    close(listen_fd);

    printf("{\"bytes\": %llu, \"chunks\": %llu, \"connections\": %ld, \"seconds\": %.6f, "
           "\"cpu_user\": %.6f, \"cpu_sys\": %.6f, \"maxrss_kb\": %ld, ",
           (unsigned long long)atomic_load(&total_bytes),
           (unsigned long long)atomic_load(&total_chunks), opt.connections, seconds,
           timeval_seconds(after.ru_utime) - timeval_seconds(before.ru_utime),
           timeval_seconds(after.ru_stime) - timeval_seconds(before.ru_stime),
           after.ru_maxrss);
    long mid = atomic_load(&rss_mid_kb);
    if (mid >= 0)
        printf("\"rss_mid_kb\": %ld}\n", mid);
    else
        printf("\"rss_mid_kb\": null}\n");
    if (fflush(stdout) != 0)
        die("writing the result: %s", strerror(errno));
    return 0;
}
