/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * sealvm test guest: the memory pattern task.
 *
 * Pass g walks every configured range once, 64-bit word by word: it checks
 * that each word still holds pattern(addr, g - 1) and writes
 * pattern(addr, g).  A word that does not hold what the previous pass wrote
 * is a mismatch; contiguous mismatches are printed as one line with the
 * first address, the number of words and the first expected/actual values,
 * so every mismatching address is accounted for.
 */
#include "guest.h"

#define STEP_BYTES (64 * 1024)

static u64 gen;                 /* pass being written */
static int cur;                 /* index into cfg.ram */
static u64 addr;                /* next word */
static u64 mism_total;
static u64 mism_pass;
static u64 pass_start_ms;
static u64 run_addr, run_words, run_expected, run_got;

static inline u64 pattern(u64 a, u64 g)
{
    return (a * 0x9E3779B97F4A7C15ULL) ^ (g * 0xC2B2AE3D27D4EB4FULL) ^
           0x5EA1ED0000000000ULL;
}

static void flush_run(void)
{
    if (!run_words) {
        return;
    }
    printf("MISMATCH gen=%llu addr=0x%llx words=%llu expected=0x%llx "
           "got=0x%llx\n", gen - 1, run_addr, run_words, run_expected,
           run_got);
    run_words = 0;
}

static void note_mismatch(u64 a, u64 expected, u64 got)
{
    mism_total++;
    mism_pass++;
    if (run_words && a == run_addr + run_words * 8) {
        run_words++;
        return;
    }
    flush_run();
    run_addr = a;
    run_words = 1;
    run_expected = expected;
    run_got = got;
}

static void pattern_init(void)
{
    u64 bytes = 0;
    int i;

    for (i = 0; i < cfg.nr_ram; i++) {
        bytes += cfg.ram[i].end - cfg.ram[i].start;
        printf("PATTERN range=0x%llx-0x%llx\n", cfg.ram[i].start,
               cfg.ram[i].end);
    }
    printf("PATTERN bytes=%llu ranges=%d\n", bytes, cfg.nr_ram);
    cur = 0;
    addr = cfg.nr_ram ? cfg.ram[0].start : 0;
    pass_start_ms = now_ms();
}

static void pattern_step(void)
{
    u64 end, g = gen;

    if (!cfg.nr_ram || (cfg.pattern_passes && gen >= cfg.pattern_passes)) {
        return;
    }
    end = cfg.ram[cur].end;
    if (end - addr > STEP_BYTES) {
        end = addr + STEP_BYTES;
    }
    for (; addr < end; addr += 8) {
        volatile u64 *p = (volatile u64 *)addr;

        if (g) {
            u64 expected = pattern(addr, g - 1), got = *p;

            if (got != expected) {
                note_mismatch(addr, expected, got);
            }
        }
        *p = pattern(addr, g);
    }
    if (addr < cfg.ram[cur].end) {
        return;
    }
    if (++cur < cfg.nr_ram) {
        addr = cfg.ram[cur].start;
        return;
    }
    flush_run();
    printf("PASS gen=%llu mism=%llu ms=%llu\n", gen, mism_pass,
           now_ms() - pass_start_ms);
    gen++;
    if (cfg.pattern_passes && gen >= cfg.pattern_passes) {
        printf("PATTERN idle after %llu passes\n", gen);
    }
    mism_pass = 0;
    cur = 0;
    addr = cfg.ram[0].start;
    pass_start_ms = now_ms();
}

static void pattern_report(void)
{
    printf(" gen=%llu mism=%llu", gen, mism_total);
}

const struct task pattern_task = {
    .name = "pattern",
    .init = pattern_init,
    .step = pattern_step,
    .report = pattern_report,
};
