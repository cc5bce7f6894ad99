/* SPDX-License-Identifier: GPL-2.0-or-later */
/* sealvm test guest: the few libc functions the compiler and we need. */
#include "guest.h"

void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;

    while (n--) {
        *p++ = (u8)c;
    }
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;

    while (n--) {
        *p++ = *q++;
    }
    return d;
}

unsigned long strlen(const char *s)
{
    unsigned long n = 0;

    while (s[n]) {
        n++;
    }
    return n;
}

int strncmp(const char *a, const char *b, unsigned long n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b || !*a) {
            return (u8)*a - (u8)*b;
        }
    }
    return 0;
}

/* Decimal, or hex with 0x; optional K/M/G suffix. */
u64 parse_u64(const char *s, const char **end)
{
    u64 v = 0;
    unsigned base = 10;

    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (;; s++) {
        unsigned d;

        if (*s >= '0' && *s <= '9') {
            d = (unsigned)(*s - '0');
        } else if (base == 16 && *s >= 'a' && *s <= 'f') {
            d = (unsigned)(*s - 'a' + 10);
        } else if (base == 16 && *s >= 'A' && *s <= 'F') {
            d = (unsigned)(*s - 'A' + 10);
        } else {
            break;
        }
        v = v * base + d;
    }
    switch (*s) {
    case 'K': case 'k': v <<= 10; s++; break;
    case 'M': case 'm': v <<= 20; s++; break;
    case 'G': case 'g': v <<= 30; s++; break;
    default: break;
    }
    if (end) {
        *end = s;
    }
    return v;
}
