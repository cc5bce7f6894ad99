/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * sealvm test guest: entry point, configuration and the main loop.
 *
 * Command line (multiboot, i.e. QEMU -append), all optional:
 *   hb_ms=N            heartbeat interval in ms (default 10)
 *   pattern=on|off     run the memory pattern task (default on)
 *   pattern_range=A-B  restrict the pattern to [A, B) (hex or K/M/G)
 *   pattern_passes=N   go idle after N passes (RAM stays touched; 0 = never)
 *
 * Serial output (one line per event, parsed by sealvm.console):
 *   SEALVM-GUEST v1 ...        banner
 *   HB <seq> t=<ms> k=v ...    heartbeat, seq never resets
 *   PASS gen=<g> mism=<n> ms=<t>
 *   MISMATCH gen=<g> addr=0x<a> words=<n> expected=0x<e> got=0x<v>
 */
#include "guest.h"

#define MB_BOOT_MAGIC   0x2BADB002
#define MAP_LIMIT       (64ULL << 30)   /* identity map built by boot.S */
#define LOW_LIMIT       (1ULL << 20)

extern char __bss_end[];

struct config cfg = { .hb_ms = 10, .pattern = 1 };

static const struct task *const tasks[] = {
    &pattern_task,
    &edu_task,
    &mdma_task,
    &mtty_task,
};
#define NR_TASKS (sizeof(tasks) / sizeof(tasks[0]))

static char cmdline[1024];

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
    u32 mods_count, mods_addr, syms[4];
    u32 mmap_length, mmap_addr;
} __attribute__((packed));

struct mb_mmap {
    u32 size;
    u64 base, len;
    u32 type;
} __attribute__((packed));

static const char *arg(const char *name)
{
    const char *p = cmdline;
    unsigned long n = strlen(name);

    while (*p) {
        while (*p == ' ') {
            p++;
        }
        if (!strncmp(p, name, n) && p[n] == '=') {
            return p + n + 1;
        }
        while (*p && *p != ' ') {
            p++;
        }
    }
    return NULL;
}

static void add_ram(u64 start, u64 end)
{
    if (start < end && cfg.nr_ram < MAX_RANGES) {
        cfg.ram[cfg.nr_ram].start = start;
        cfg.ram[cfg.nr_ram].end = end;
        cfg.nr_ram++;
    }
}

static void parse_boot_info(u32 magic, u32 info)
{
    const struct mb_info *mb = (const struct mb_info *)(uptr)info;
    u64 floor = ALIGN_UP((u64)(uptr)__bss_end, 2ULL << 20);
    const char *v;
    u64 lo = 0, hi = ~0ULL;

    if (magic != MB_BOOT_MAGIC) {
        panic("not booted by a multiboot loader");
    }
    if ((mb->flags & 4) && mb->cmdline) {
        const char *s = (const char *)(uptr)mb->cmdline;
        unsigned long n = strlen(s);

        if (n >= sizeof(cmdline)) {
            n = sizeof(cmdline) - 1;
        }
        memcpy(cmdline, s, n);
    }
    v = arg("hb_ms");
    if (v) {
        cfg.hb_ms = parse_u64(v, NULL);
        if (!cfg.hb_ms) {
            cfg.hb_ms = 1;
        }
    }
    v = arg("pattern");
    if (v && !strncmp(v, "off", 3)) {
        cfg.pattern = 0;
    }
    v = arg("pattern_passes");
    if (v) {
        cfg.pattern_passes = parse_u64(v, NULL);
    }
    v = arg("pattern_range");
    if (v) {
        const char *e;

        lo = parse_u64(v, &e);
        hi = *e == '-' ? parse_u64(e + 1, NULL) : ~0ULL;
    }
    if (lo < floor) {
        lo = floor;
    }
    if (!(mb->flags & 64)) {
        panic("no memory map from the loader");
    }
    for (u32 off = 0; off < mb->mmap_length;) {
        const struct mb_mmap *e =
            (const struct mb_mmap *)(uptr)(mb->mmap_addr + off);
        u64 s = e->base, t = e->base + e->len;

        off += e->size + 4;
        if (e->type != 1) {
            continue;
        }
        cfg.ram_total += e->len;
        if (t > MAP_LIMIT) {
            t = MAP_LIMIT;
        }
        if (s < LOW_LIMIT) {
            continue;   /* below 1 MiB: BIOS data, not ours */
        }
        if (s < lo) {
            s = lo;
        }
        if (t > hi) {
            t = hi;
        }
        if (cfg.pattern) {
            add_ram(ALIGN_UP(s, 4096), t & ~4095ULL);
        }
    }
}

void kmain(u32 magic, u32 info);

void kmain(u32 magic, u32 info)
{
    u64 seq = 0, next;
    unsigned i;

    console_init();
    parse_boot_info(magic, info);
    printf("SEALVM-GUEST v1 ram=%llu hb_ms=%llu pattern=%s cmdline=\"%s\"\n",
           cfg.ram_total, cfg.hb_ms, cfg.pattern ? "on" : "off", cmdline);
    timer_init();
    for (i = 0; i < NR_TASKS; i++) {
        tasks[i]->init();
    }
    next = now_ms();
    for (;;) {
        u64 now = now_ms();

        if (now >= next) {
            printf("HB %llu t=%llu", seq++, now);
            for (i = 0; i < NR_TASKS; i++) {
                if (tasks[i]->report) {
                    tasks[i]->report();
                }
            }
            putc('\n');
            /* never burst to catch up: the sequence, not the count, matters */
            next += cfg.hb_ms;
            if (next <= now) {
                next = now + cfg.hb_ms;
            }
        }
        for (i = 0; i < NR_TASKS; i++) {
            tasks[i]->step();
        }
    }
}
