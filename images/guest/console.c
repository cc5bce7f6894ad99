/* SPDX-License-Identifier: GPL-2.0-or-later */
/* sealvm test guest: 16550 UART on COM1 and a tiny printf. */
#include <stdarg.h>
#include "guest.h"

#define COM1 0x3f8

void console_init(void)
{
    outb(COM1 + 1, 0x00);       /* no interrupts */
    outb(COM1 + 3, 0x80);       /* DLAB */
    outb(COM1 + 0, 0x01);       /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);       /* 8N1 */
    outb(COM1 + 2, 0xC7);       /* FIFO */
}

void putc(char c)
{
    if (c == '\n') {
        putc('\r');
    }
    while (!(inb(COM1 + 5) & 0x20)) {
        /* wait for THR empty */
    }
    outb(COM1, (u8)c);
}

static void puts_n(const char *s, int pad, char padc)
{
    int n = (int)strlen(s);

    while (pad-- > n) {
        putc(padc);
    }
    while (*s) {
        putc(*s++);
    }
}

static void put_num(u64 v, unsigned base, int pad, char padc)
{
    char buf[24];
    int i = (int)sizeof(buf) - 1;

    buf[i] = 0;
    do {
        buf[--i] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    puts_n(&buf[i], pad, padc);
}

/* Supports %s %c %d %u %x %lu %lx %llu %llx %lld %p and %%, width + '0'. */
void printf(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        int pad = 0, longs = 0;
        char padc = ' ';

        if (*fmt != '%') {
            putc(*fmt);
            continue;
        }
        fmt++;
        if (*fmt == '0') {
            padc = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9') {
            pad = pad * 10 + (*fmt++ - '0');
        }
        while (*fmt == 'l') {
            longs++;
            fmt++;
        }
        switch (*fmt) {
        case 's':
            puts_n(va_arg(ap, const char *), pad, padc);
            break;
        case 'c':
            putc((char)va_arg(ap, int));
            break;
        case 'd': {
            s64 v = longs ? va_arg(ap, s64) : va_arg(ap, int);
            if (v < 0) {
                putc('-');
                v = -v;
            }
            put_num((u64)v, 10, pad, padc);
            break;
        }
        case 'u':
            put_num(longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, pad, padc);
            break;
        case 'x':
            put_num(longs ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, pad, padc);
            break;
        case 'p':
            puts_n("0x", 0, ' ');
            put_num((u64)va_arg(ap, void *), 16, pad, padc);
            break;
        case '%':
            putc('%');
            break;
        default:
            putc('?');
            break;
        }
    }
    va_end(ap);
}
