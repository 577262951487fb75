/*
 * How long one copy out of a page-aligned area buffer takes, by where the
 * destination starts within its page: glibc's memcpy against iouzcrx's
 * iouz_copy (iouzcrx/_copy.h, which copies in pieces where memcpy would
 * use a slow `rep movsb`).
 *
 *   cc -O2 -Iiouzcrx -o /tmp/copy_offsets benchmarks/c/copy_offsets.c
 *   /tmp/copy_offsets [BYTES]          (default 16384)
 *
 * Prints microseconds per copy for each destination offset; on CPUs where
 * `rep movsb` does not mind the offset both columns stay flat.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "_copy.h"

#define ROUNDS 100000

typedef void copy_fn(void *, const void *, size_t);

static void plain(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }

static double seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double us_per_copy(copy_fn *copy, char *dst, const char *src, size_t n)
{
    double start = seconds();
    for (int i = 0; i < ROUNDS; i++) {
        copy(dst, src, n);
        __asm__ volatile("" ::: "memory"); /* keep every copy */
    }
    return (seconds() - start) / ROUNDS * 1e6;
}

int main(int argc, char **argv)
{
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 16384;
    size_t span = n + 2 * 4096;
    char *src = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *dst = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (src == MAP_FAILED || dst == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    memset(src, 1, span);
    memset(dst, 2, span);
    static const int offsets[] = {0, 1, 16, 32, 48, 63, 64, 128, 2048};
    printf("%zu bytes from a page-aligned source\n", n);
    printf("%-22s %12s %12s\n", "destination offset", "memcpy us", "iouz_copy us");
    for (size_t i = 0; i < sizeof(offsets) / sizeof(offsets[0]); i++) {
        char *to = dst + offsets[i];
        printf("%-22d %12.3f %12.3f\n", offsets[i], us_per_copy(plain, to, src, n),
               us_per_copy(iouz_copy, to, src, n));
        if (memcmp(to, src, n) != 0) {
            fprintf(stderr, "copy to offset %d differs\n", offsets[i]);
            return 1;
        }
    }
    return 0;
}
