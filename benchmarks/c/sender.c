/*
 * sender: load generator for the receive benchmarks.
 *
 * Connects to a receiver on 127.0.0.1 (or the IPv4 address given with
 * --host) and drives one of three scenarios:
 *
 *   sender --port P --scenario bulk  --connections N --bytes B [--send-size S]
 *       N threads, one connection each, established before anyone sends (a
 *       barrier keeps connect cost out of the window); each sends B bytes in
 *       blocking send()s of S bytes (default 1 MiB) from a page-aligned
 *       buffer, then shutdown(SHUT_WR), reads until the receiver closes, and
 *       closes.
 *
 *   sender --port P --scenario bulk --connections N --bytes B --message-size MIN-MAX
 *       The same with small messages: TCP_NODELAY, and one send() per message
 *       of MIN..MAX bytes (sizes from a fixed pseudo-random sequence per
 *       connection, the last one cut to make B), so that each connection's
 *       segments stay about one message long.  With --message-pause-us U
 *       each connection sleeps U microseconds after every message: a peer
 *       that sends when it has something to say, rather than a flood that
 *       the receiver drains in large reads.
 *
 *   sender --port P --scenario rr --request-size K --response-size R
 *          --requests Q [--warmup W]
 *       One TCP_NODELAY connection: send K bytes, read exactly R bytes back,
 *       W (default 100) warm-up rounds then Q timed rounds.  The window covers
 *       the Q timed rounds only, so rate = Q / seconds.  Response content is
 *       not checked, only its length; bytes arriving after the last response
 *       count as a mismatch.
 *
 *   sender --port P --scenario short --connections M --bytes B [--threads T]
 *       T threads (default 1) share M connections; each connection connects,
 *       sends B bytes, shuts down its write side, reads until the receiver
 *       closes, and closes.  Connect cost is part of the window here.
 *
 * On success one JSON line goes to stdout:
 *   {"seconds", "cpu_user", "cpu_sys", "bytes", "connections", "requests",
 *    "rate", "p50_us", "p99_us", "min_us", "max_us"}
 * "bytes" is every byte sent, warm-up included; "rate" is requests/s (rr),
 * connections/s (short) or 0 (bulk); latencies are null except for rr.
 * On any failure a message naming it goes to stderr and the exit code is 1.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
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
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROGRAM "sender"
#include "bench.h"

#define PAGE 4096
#define DEFAULT_SEND_SIZE (1u << 20)
#define DEFAULT_WARMUP 100
/* connect() retries on transient local shortages (ephemeral ports still in
 * TIME_WAIT, full SYN queues): bounded so a stuck run fails instead of hanging. */
#define CONNECT_ATTEMPTS 400
#define CONNECT_BACKOFF_NS 5000000L


static struct {
    enum scenario scenario;
    struct in_addr host;
    int port;
    long connections;
    unsigned long long bytes;
    size_t send_size;
    size_t message_min;     /* nonzero: small messages of message_min..message_max */
    size_t message_max;
    long message_pause_us;
    size_t request_size;
    size_t response_size;
    unsigned long long requests;
    unsigned long long warmup;
    long threads;
} opt;

static unsigned char *payload;          /* shared, read-only once filled */
static pthread_barrier_t start_barrier;
static atomic_long next_connection;     /* short: next connection to make */
static atomic_ullong bytes_sent;

static void usage(void)
{
    fputs("usage:\n"
          "  sender --port P --scenario bulk --connections N --bytes B [--send-size S]\n"
          "  sender --port P --scenario bulk --connections N --bytes B --message-size MIN-MAX"
          " [--message-pause-us U]\n"
          "  sender --port P --scenario rr --request-size K --response-size R --requests Q"
          " [--warmup W]\n"
          "  sender --port P --scenario short --connections M --bytes B [--threads T]\n"
          "  (any of them with --host A.B.C.D; the default is 127.0.0.1)\n",
          stderr);
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int connect_to_receiver(void)
{
    struct sockaddr_in addr = {
        .sin_family = AF_INET,
        .sin_port = htons((uint16_t)opt.port),
        .sin_addr = opt.host,
    };
    for (int attempt = 0;; attempt++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            die("socket: %s", strerror(errno));
        if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0)
            return fd;
        int err = errno;
        close(fd);
        if ((err == EAGAIN || err == EADDRNOTAVAIL || err == EINTR) &&
            attempt + 1 < CONNECT_ATTEMPTS) {
            struct timespec pause = { 0, CONNECT_BACKOFF_NS };
            nanosleep(&pause, NULL);
            continue;
        }
        char text[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &opt.host, text, sizeof(text));
        die("connect to %s:%d: %s", text, opt.port, strerror(err));
    }
}

/* Sends `total` bytes in pieces of at most opt.send_size. */
static void send_bytes(int fd, unsigned long long total)
{
    unsigned long long left = total;
    while (left > 0) {
        size_t n = left < opt.send_size ? (size_t)left : opt.send_size;
        send_all(fd, payload, n);
        left -= n;
    }
    atomic_fetch_add_explicit(&bytes_sent, total, memory_order_relaxed);
}

/* After our FIN, wait for the receiver's close; it has nothing to say in
 * these scenarios, so any data is a protocol error. */
static void finish_connection(int fd)
{
    if (shutdown(fd, SHUT_WR) < 0)
        die("shutdown: %s", strerror(errno));
    unsigned char scratch[256];
    for (;;) {
        ssize_t n = recv(fd, scratch, sizeof(scratch), 0);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("waiting for the receiver to close: %s", strerror(errno));
        }
        die("response mismatch: %zd unexpected bytes from the receiver", n);
    }
    close(fd);
}

/* ---- bulk ----------------------------------------------------------------- */

/* Small messages, each its own send() with Nagle off: what a chat or RPC
 * peer does, where every segment is a message and not a full buffer. */
static void send_messages(int fd, unsigned long long total, uint32_t seed)
{
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
        die("setsockopt TCP_NODELAY: %s", strerror(errno));
    size_t span = opt.message_max - opt.message_min + 1;
    unsigned long long left = total;
    while (left > 0) {
        seed = seed * 1103515245u + 12345u;
        size_t n = opt.message_min + (size_t)(seed >> 8) % span;
        if (n > left)
            n = (size_t)left;
        send_all(fd, payload, n);
        left -= n;
        if (opt.message_pause_us && left > 0) {
            struct timespec pause = { opt.message_pause_us / 1000000,
                                      opt.message_pause_us % 1000000 * 1000 };
            nanosleep(&pause, NULL);
        }
    }
    atomic_fetch_add_explicit(&bytes_sent, total, memory_order_relaxed);
}

static void *bulk_thread(void *arg)
{
    int fd = connect_to_receiver();
    pthread_barrier_wait(&start_barrier);
    if (opt.message_min)
        send_messages(fd, opt.bytes, (uint32_t)(uintptr_t)arg);
    else
        send_bytes(fd, opt.bytes);
    finish_connection(fd);
    return NULL;
}

/* ---- short ---------------------------------------------------------------- */

static void *short_thread(void *arg)
{
    (void)arg;
    pthread_barrier_wait(&start_barrier);
    while (atomic_fetch_add(&next_connection, 1) < opt.connections) {
        int fd = connect_to_receiver();
        send_bytes(fd, opt.bytes);
        finish_connection(fd);
    }
    return NULL;
}

/* Runs `count` threads that meet the main thread at the start barrier and
 * measures from the barrier to the last join. */
static void run_threads(long count, void *(*body)(void *), double *seconds,
                        struct rusage *before, struct rusage *after)
{
    pthread_t *threads = calloc((size_t)count, sizeof(*threads));
    if (threads == NULL)
        die("out of memory");
    if (pthread_barrier_init(&start_barrier, NULL, (unsigned)count + 1) != 0)
        die("pthread_barrier_init failed");
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    /* Hundreds of threads: keep their stacks small, they only call send/recv. */
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (long i = 0; i < count; i++) {
        int err = pthread_create(&threads[i], &attr, body, (void *)(uintptr_t)(i + 1));
        if (err)
            die("pthread_create: %s", strerror(err));
    }
    pthread_attr_destroy(&attr);
    pthread_barrier_wait(&start_barrier);
    double start = now_seconds();
    getrusage(RUSAGE_SELF, before);
    for (long i = 0; i < count; i++)
        pthread_join(threads[i], NULL);
    *seconds = now_seconds() - start;
    getrusage(RUSAGE_SELF, after);
    pthread_barrier_destroy(&start_barrier);
    free(threads);
}

/* ---- rr ------------------------------------------------------------------- */

static void recv_exact(int fd, unsigned char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = recv(fd, buf, len, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("reading a response: %s", strerror(errno));
        }
        if (n == 0)
            die("unexpected EOF: the receiver closed with %zu response bytes missing", len);
        buf += n;
        len -= (size_t)n;
    }
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted sample, in microseconds. */
static double percentile_us(const uint64_t *sorted, unsigned long long n, double p)
{
    unsigned long long rank = (unsigned long long)(p * (double)n + 0.999999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return (double)sorted[rank - 1] / 1000.0;
}

static void run_rr(double *seconds, struct rusage *before, struct rusage *after,
                   uint64_t *latencies)
{
    unsigned char *response;
    if (posix_memalign((void **)&response, PAGE, opt.response_size ? opt.response_size : 1))
        die("out of memory");
    int fd = connect_to_receiver();
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
        die("setsockopt TCP_NODELAY: %s", strerror(errno));

    unsigned long long total = opt.warmup + opt.requests;
    double start = 0;
    for (unsigned long long i = 0; i < total; i++) {
        if (i == opt.warmup) {
            start = now_seconds();
            getrusage(RUSAGE_SELF, before);
        }
        uint64_t t0 = now_ns();
        send_all(fd, payload, opt.request_size);
        recv_exact(fd, response, opt.response_size);
        uint64_t t1 = now_ns();
        if (i >= opt.warmup)
            latencies[i - opt.warmup] = t1 - t0;
    }
    *seconds = now_seconds() - start;
    getrusage(RUSAGE_SELF, after);
    atomic_fetch_add(&bytes_sent, total * opt.request_size);
    finish_connection(fd);
    free(response);
}

/* ---- main ----------------------------------------------------------------- */

static void parse_args(int argc, char **argv)
{
    const char *scenario = NULL;
    int have_port = 0, have_bytes = 0, have_requests = 0;
    int have_request_size = 0, have_response_size = 0;
    opt.connections = -1;
    opt.send_size = DEFAULT_SEND_SIZE;
    opt.warmup = DEFAULT_WARMUP;
    opt.threads = 1;
    opt.host.s_addr = htonl(INADDR_LOOPBACK);
    for (int i = 1; i < argc; i++) {
        const char *name = argv[i];
        if (strcmp(name, "-h") == 0 || strcmp(name, "--help") == 0)
            usage();
        if (i + 1 >= argc) {
            fprintf(stderr, "sender: %s needs a value\n", name);
            usage();
        }
        const char *value = argv[++i];
        if (strcmp(name, "--port") == 0) {
            opt.port = (int)parse_in_range(name, value, 1, 65535);
            have_port = 1;
        } else if (strcmp(name, "--host") == 0) {
            if (inet_pton(AF_INET, value, &opt.host) != 1)
                die("--host must be an IPv4 address, not %s", value);
        } else if (strcmp(name, "--scenario") == 0) {
            scenario = value;
        } else if (strcmp(name, "--connections") == 0) {
            opt.connections = (long)parse_in_range(name, value, 1, 1000000);
        } else if (strcmp(name, "--bytes") == 0) {
            opt.bytes = parse_count(name, value);
            have_bytes = 1;
        } else if (strcmp(name, "--send-size") == 0) {
            opt.send_size = (size_t)parse_in_range(name, value, 1, 1ull << 30);
        } else if (strcmp(name, "--message-size") == 0) {
            char *dash = strchr(value, '-');
            if (dash == NULL)
                die("--message-size wants MIN-MAX (bytes), e.g. 100-500, not %s", value);
            *dash = '\0';
            opt.message_min = (size_t)parse_in_range(name, value, 1, 1u << 20);
            opt.message_max = (size_t)parse_in_range(name, dash + 1, 1, 1u << 20);
            if (opt.message_max < opt.message_min)
                die("--message-size %zu-%zu: MIN must not exceed MAX", opt.message_min,
                    opt.message_max);
        } else if (strcmp(name, "--message-pause-us") == 0) {
            opt.message_pause_us = (long)parse_in_range(name, value, 0, 10000000);
        } else if (strcmp(name, "--request-size") == 0) {
            opt.request_size = (size_t)parse_in_range(name, value, 1, 1ull << 30);
            have_request_size = 1;
        } else if (strcmp(name, "--response-size") == 0) {
            opt.response_size = (size_t)parse_in_range(name, value, 1, 1ull << 30);
            have_response_size = 1;
        } else if (strcmp(name, "--requests") == 0) {
            opt.requests = parse_count(name, value);
            if (opt.requests == 0 || opt.requests > (1ull << 32))
                die("--requests must be 1..2^32");
            have_requests = 1;
        } else if (strcmp(name, "--warmup") == 0) {
            opt.warmup = parse_count(name, value);
        } else if (strcmp(name, "--threads") == 0) {
            opt.threads = (long)parse_in_range(name, value, 1, 4096);
        } else {
            fprintf(stderr, "sender: unknown option %s\n", name);
            usage();
        }
    }
    if (!have_port || scenario == NULL)
        usage();
    opt.scenario = scenario_named(scenario);
    if (opt.scenario == BULK) {
        if (opt.connections < 0 || !have_bytes)
            die("bulk needs --connections and --bytes");
        if (opt.connections > 4096)
            die("bulk runs a thread per connection: at most 4096 connections");
        if (opt.message_max > opt.send_size)
            opt.send_size = opt.message_max;  /* the payload buffer holds a message */
    } else if (opt.scenario == RR) {
        if (!have_request_size || !have_response_size || !have_requests)
            die("rr needs --request-size, --response-size and --requests");
        if (opt.connections > 1)
            die("rr uses exactly one connection");
        opt.connections = 1;
    } else {
        if (opt.connections < 0 || !have_bytes)
            die("short needs --connections and --bytes");
        if (opt.threads > opt.connections)
            opt.threads = opt.connections;
    }
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    /* send() uses MSG_NOSIGNAL, but be safe against any other path. */
    signal(SIGPIPE, SIG_IGN);

    size_t payload_size = opt.scenario == RR ? opt.request_size : opt.send_size;
    if (posix_memalign((void **)&payload, PAGE, payload_size))
        die("out of memory for a %zu-byte send buffer", payload_size);
    for (size_t i = 0; i < payload_size; i++)
        payload[i] = (unsigned char)(i * 131u + 7u);

    double seconds = 0;
    struct rusage before, after;
    uint64_t *latencies = NULL;
    double rate = 0;
    switch (opt.scenario) {
    case BULK:
        run_threads(opt.connections, bulk_thread, &seconds, &before, &after);
        break;
    case SHORT:
        run_threads(opt.threads, short_thread, &seconds, &before, &after);
        rate = seconds > 0 ? (double)opt.connections / seconds : 0;
        break;
    case RR:
        latencies = malloc(opt.requests * sizeof(*latencies));
        if (latencies == NULL)
            die("out of memory for %llu latencies", opt.requests);
        run_rr(&seconds, &before, &after, latencies);
        rate = seconds > 0 ? (double)opt.requests / seconds : 0;
        break;
    }

    double cpu_user = timeval_seconds(after.ru_utime) - timeval_seconds(before.ru_utime);
    double cpu_sys = timeval_seconds(after.ru_stime) - timeval_seconds(before.ru_stime);
    printf("{\"seconds\": %.6f, \"cpu_user\": %.6f, \"cpu_sys\": %.6f, \"bytes\": %llu, "
           "\"connections\": %ld, \"requests\": %llu, \"rate\": %.3f, ",
           seconds, cpu_user, cpu_sys, (unsigned long long)atomic_load(&bytes_sent),
           opt.connections, opt.scenario == RR ? opt.requests : 0ull, rate);
    if (latencies != NULL) {
        qsort(latencies, opt.requests, sizeof(*latencies), compare_u64);
        printf("\"p50_us\": %.3f, \"p99_us\": %.3f, \"min_us\": %.3f, \"max_us\": %.3f}\n",
               percentile_us(latencies, opt.requests, 0.50),
               percentile_us(latencies, opt.requests, 0.99),
               (double)latencies[0] / 1000.0,
               (double)latencies[opt.requests - 1] / 1000.0);
    } else {
        printf("\"p50_us\": null, \"p99_us\": null, \"min_us\": null, \"max_us\": null}\n");
    }
    if (fflush(stdout) != 0)
        die("writing the result: %s", strerror(errno));
    free(latencies);
    free(payload);
    return 0;
}
