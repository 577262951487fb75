/* Copies out of the receive area.
 *
 * glibc's memcpy switches to `rep movsb` above a few KiB. On AMD Zen that
 * instruction runs about twenty times slower when the destination lies less
 * than 64 bytes past the source modulo a page, and that is the usual case
 * here: area buffers start on a page, while a large bytearray's or bytes'
 * data sits 16 to 48 bytes into its page. Such pairs are copied in pieces
 * small enough for glibc's vector loop; every other pair goes to memcpy
 * whole. benchmarks/c/copy_offsets.c times both by destination offset (on
 * an AMD EPYC, 16 KiB 16 bytes into a page: 6-9 us with memcpy, 0.4-1.4 us
 * in pieces; 0.3-0.4 us either way at offset 0). */
#ifndef IOUZCRX_COPY_H
#define IOUZCRX_COPY_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Below every default rep-movsb threshold of glibc (2 KiB and up). */
#define IOUZ_COPY_PIECE 1024

static inline void iouz_copy(void *dst, const void *src, size_t n)
{
    size_t ahead = ((uintptr_t)dst - (uintptr_t)src) & 4095;
    char *d = (char *)dst;
    const char *s = (const char *)src;
    if (n > IOUZ_COPY_PIECE && ahead != 0 && ahead < 64) {
        while (n > IOUZ_COPY_PIECE) {
            memcpy(d, s, IOUZ_COPY_PIECE);
            d += IOUZ_COPY_PIECE;
            s += IOUZ_COPY_PIECE;
            n -= IOUZ_COPY_PIECE;
        }
    }
    memcpy(d, s, n);
}

#endif /* IOUZCRX_COPY_H */
