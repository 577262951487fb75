/*
 * Helpers shared by the benchmark's C programs: fatal errors, number
 * parsing, clocks, whole-buffer sends and the loopback listener.
 *
 * Each program defines PROGRAM (its name, for error messages) before
 * including this header; everything here is static, one copy per program.
 */
#ifndef IOUZCRX_BENCH_H
#define IOUZCRX_BENCH_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>

#ifndef PROGRAM
#error "define PROGRAM before including bench.h"
#endif

#define LISTEN_BACKLOG 4096

enum scenario { BULK, RR, SHORT };

/* Print "PROGRAM: message" and exit 1; exit also stops any other thread
 * blocked in send() or recv(). */
__attribute__((format(printf, 1, 2), noreturn, unused))
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(PROGRAM ": ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

/* A non-negative decimal integer given for option `name`; anything else
 * (empty, signed, suffixed, out of range) is a usage error. */
__attribute__((unused))
static unsigned long long parse_count(const char *name, const char *text)
{
    char *end;
    errno = 0;
    if (text == NULL || *text == '\0' || *text == '-')
        die("%s needs a non-negative integer", name);
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || *end != '\0')
        die("%s: not a non-negative integer: %s", name, text);
    return v;
}

/* An option value in lo..hi, or exit naming the range. */
__attribute__((unused))
static unsigned long long parse_in_range(const char *name, const char *text,
                                         unsigned long long lo, unsigned long long hi)
{
    unsigned long long v = parse_count(name, text);
    if (v < lo || v > hi)
        die("%s must be %llu..%llu", name, lo, hi);
    return v;
}

__attribute__((unused))
static enum scenario scenario_named(const char *name)
{
    if (strcmp(name, "bulk") == 0)
        return BULK;
    if (strcmp(name, "rr") == 0)
        return RR;
    if (strcmp(name, "short") == 0)
        return SHORT;
    die("unknown scenario %s (bulk, rr or short)", name);
}

/* The options both receivers take: 1 if ``name`` is one of them (its value
 * stored), 0 if the receiver's own parser should look at it. */
__attribute__((unused))
static int receiver_option(const char *name, const char *value, const char **scenario,
                           long *connections, size_t *request_size, size_t *response_size)
{
    if (strcmp(name, "--scenario") == 0)
        *scenario = value;
    else if (strcmp(name, "--connections") == 0)
        *connections = (long)parse_in_range(name, value, 1, 1000000);
    else if (strcmp(name, "--request-size") == 0)
        *request_size = (size_t)parse_in_range(name, value, 1, 1ull << 30);
    else if (strcmp(name, "--response-size") == 0)
        *response_size = (size_t)parse_in_range(name, value, 1, 1ull << 30);
    else
        return 0;
    return 1;
}

/* The receivers' --scenario, with what request/response needs. */
__attribute__((unused))
static enum scenario receiver_scenario(const char *name, size_t request_size,
                                       size_t response_size, long connections)
{
    enum scenario s = scenario_named(name);
    if (s == RR && (request_size == 0 || response_size == 0))
        die("rr needs --request-size and --response-size");
    if (s == RR && connections != 1)
        die("rr uses exactly one connection (--connections 1)");
    return s;
}

__attribute__((unused))
static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

__attribute__((unused))
static double timeval_seconds(struct timeval tv)
{
    return (double)tv.tv_sec + (double)tv.tv_usec * 1e-6;
}

/* Blocking send of the whole buffer (MSG_NOSIGNAL: a closed peer is an
 * error message, not a SIGPIPE). */
__attribute__((unused))
static void send_all(int fd, const unsigned char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("send: %s", strerror(errno));
        }
        if (n == 0)
            die("send: short write (0 bytes accepted)");
        buf += n;
        len -= (size_t)n;
    }
}

/* A socket listening on 127.0.0.1 at a port the kernel picks; *port gets it. */
__attribute__((unused))
static int listen_loopback(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket: %s", strerror(errno));
    struct sockaddr_in addr = {
        .sin_family = AF_INET,
        .sin_port = 0,
        .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
    };
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        die("bind 127.0.0.1:0: %s", strerror(errno));
    if (listen(fd, LISTEN_BACKLOG) < 0)
        die("listen: %s", strerror(errno));
    socklen_t len = sizeof(addr);
    if (getsockname(fd, (struct sockaddr *)&addr, &len) < 0)
        die("getsockname: %s", strerror(errno));
    *port = ntohs(addr.sin_port);
    return fd;
}

/* The receivers' listener on 127.0.0.1, its port told to the driver as
 * "READY <port>" on stdout. */
__attribute__((unused))
static int listen_announced(void)
{
    int port;
    int fd = listen_loopback(&port);
    printf("READY %d\n", port);
    fflush(stdout);
    return fd;
}

/* The next connection (blocking). */
__attribute__((unused))
static int accept_one(int listen_fd)
{
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0)
            return fd;
        /* A connection reset before we got to it is the peer's business. */
        if (errno != EINTR && errno != ECONNABORTED)
            die("accept: %s", strerror(errno));
    }
}

#endif
