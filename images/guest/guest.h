/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * sealvm test guest: shared declarations.
 *
 * The guest runs a cooperative loop over "tasks".  Each task has an init
 * hook and a step hook; step must return quickly (well under a heartbeat
 * interval) so the heartbeat stays on time.  The heartbeat itself is driven
 * by the PIT interrupt and printed from the loop.  A device exerciser (the
 * edu DMA engine) is one more task beside the pattern task.
 */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long s64;
typedef unsigned long uptr;

#define NULL ((void *)0)
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((u64)(a) - 1))

static inline void outb(u16 port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void outl(u16 port, u32 v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* console.c: COM1 output */
void console_init(void);
void putc(char c);
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* util.c */
void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);
unsigned long strlen(const char *s);
int strncmp(const char *a, const char *b, unsigned long n);
u64 parse_u64(const char *s, const char **end);

/* pci.c: configuration space, for the device tasks */
u32 pci_read(u32 bdf, u32 off);
void pci_write(u32 bdf, u32 off, u32 v);
int pci_find(u16 vendor, u16 device, u32 *bdf);  /* 1 if found */

/* timer.c: IDT, PIC, PIT at 1 kHz */
void timer_init(void);
u64 now_ms(void);               /* guest virtual milliseconds since boot */
void panic(const char *why) __attribute__((noreturn));

/* Boot configuration, parsed from the multiboot command line. */
struct ram_range {
    u64 start, end;             /* [start, end) */
};

#define MAX_RANGES 16

struct config {
    u64 hb_ms;                          /* heartbeat interval */
    int pattern;                        /* pattern task on/off */
    u64 pattern_passes;                 /* stop after N passes, 0 = never */
    u64 pattern_start, pattern_end;     /* user range, 0/0 = default */
    struct ram_range ram[MAX_RANGES];   /* usable RAM above the image */
    int nr_ram;
    u64 ram_total;                      /* all RAM reported by firmware */
};

extern struct config cfg;

/* Tasks */
struct task {
    const char *name;
    void (*init)(void);
    void (*step)(void);
    /* appended to each heartbeat line ("key=value ..."), may be NULL */
    void (*report)(void);
};

extern const struct task pattern_task;
extern const struct task edu_task;
extern const struct task mdma_task;
extern const struct task mtty_task;

#endif
