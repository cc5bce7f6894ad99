/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * sealvm test guest: the edu DMA exerciser.
 *
 * QEMU's `edu` device (hw/misc/edu.c, docs/specs/edu.rst) is a DMA engine
 * with a 4 KiB buffer at 0x40000 in its own address space.  Assigned to
 * this guest through VFIO, its DMA goes through the host IOMMU into guest
 * RAM: exactly the mapping sealvm must keep alive across a live update.
 *
 * The task finds edu on PCI (config mechanism #1, ports 0xcf8/0xcfc),
 * enables MEM and bus mastering, and loops forever without blocking:
 *
 *   fill src page with a pattern unique to round n
 *   DMA src page -> device buffer     (cmd = RUN)
 *   clear dst page
 *   DMA device buffer -> dst page     (cmd = RUN | TO_RAM)
 *   compare dst with src
 *
 * Each transfer completes 100 ms of virtual time after it starts.  A lost
 * leg (no IOMMU mapping, device reset) leaves stale or zero data behind,
 * which the compare catches because every round uses its own pattern.
 * The two DMA pages live in .bss, below the range the pattern task owns.
 *
 * Serial output, only when an edu device is present:
 *   EDU found bdf=BB:DD.F bar0=0x... id=0x...    at init
 *   EDU-ERR round=<n> what=<...> ...             on each failure
 *   heartbeat fields: dma=<rounds verified> dma_err=<rounds failed>
 *     dma_iss=<transfers started> dma_fin=<transfers seen finished>
 *     dma_dur_us=<duration of the last finished transfer, HPET us; 0: none
 *                 or no HPET>
 *
 * dma_iss > dma_fin means a transfer is in flight.  Durations come from the
 * HPET main counter, which runs on QEMU's virtual clock (stops while the VM
 * is paused; the PIT tick count loses ticks when the guest runs slowly, the
 * counter does not).  edu itself lives one level down (its 100 ms run on
 * the clock of the host it is emulated by, which never stops), so a
 * transfer that takes clearly less than 100 ms of this clock spent the rest
 * while this guest was paused: it was issued before the pause and seen
 * finished after it.
 */
#include "guest.h"

#define EDU_VENDOR      0x1234
#define EDU_DEVICE      0x11e8
#define EDU_ID          0x00
#define EDU_DMA_SRC     0x80
#define EDU_DMA_DST     0x88
#define EDU_DMA_CNT     0x90
#define EDU_DMA_CMD     0x98
#define EDU_CMD_RUN     0x1
#define EDU_CMD_TO_RAM  0x2
#define EDU_BUF         0x40000ULL
#define HPET_BASE       0xFED00000ULL
#define HPET_CAP        0x000   /* bits 63:32: counter period, fs */
#define HPET_CFG        0x010   /* bit 0: counter enabled */
#define HPET_COUNTER    0x0F0
#define DMA_BYTES       4096
#define DMA_TIMEOUT_MS  5000    /* guest time: stops while the VM is paused */

#define PCI_COMMAND     0x04
#define PCI_CMD_MEM     0x2
#define PCI_CMD_MASTER  0x4

enum state { ABSENT, IDLE, TO_DEVICE, TO_RAM };

static u8 src_page[DMA_BYTES] __attribute__((aligned(4096)));
static u8 dst_page[DMA_BYTES] __attribute__((aligned(4096)));

static enum state state = ABSENT;
static volatile u8 *bar0;
static u64 round_no, done_ok, done_err, started_ms, last_poll_ms;
static u64 issued, finished, started_us, last_dur_us;
static volatile u8 *hpet;
static u64 hpet_ns_per_tick;

static u64 rd64(u32 off)
{
    return *(volatile u64 *)(bar0 + off);
}

static void wr64(u32 off, u64 v)
{
    *(volatile u64 *)(bar0 + off) = v;
}

static u32 rd32(u32 off)
{
    return *(volatile u32 *)(bar0 + off);
}

/* The HPET main counter, enabled; left unset when there is none. */
static void hpet_init(void)
{
    volatile u8 *base = (volatile u8 *)(uptr)HPET_BASE;
    u32 fs = (u32)(*(volatile u64 *)(base + HPET_CAP) >> 32);

    if (fs < 1000000 || fs > 100000000) {
        return;                 /* absent (reads 0 or ~0) or not whole ns */
    }
    hpet = base;
    hpet_ns_per_tick = fs / 1000000;
    *(volatile u64 *)(hpet + HPET_CFG) |= 1;
}

static u64 hpet_us(void)
{
    return hpet ? *(volatile u64 *)(hpet + HPET_COUNTER) * hpet_ns_per_tick / 1000 : 0;
}

static u64 fill(u64 i)
{
    return (round_no * 0x9E3779B97F4A7C15ULL) ^ (i * 0xD6E8FEB86659FD93ULL) ^
           0xED0DA7A000000000ULL;
}

static void fail(const char *what, u64 arg)
{
    done_err++;
    finished = issued;          /* given up: nothing in flight */
    printf("EDU-ERR round=%llu what=%s arg=0x%llx\n", round_no, what, arg);
    state = IDLE;
}

static void start(u64 src, u64 dst, u64 cmd)
{
    wr64(EDU_DMA_SRC, src);
    wr64(EDU_DMA_DST, dst);
    wr64(EDU_DMA_CNT, DMA_BYTES);
    /* before the command: a measured duration is never shorter than the run */
    started_ms = now_ms();
    started_us = hpet_us();
    wr64(EDU_DMA_CMD, cmd);
    issued++;
}

static void edu_init(void)
{
    u32 bdf, lo, id;
    u64 base;

    if (!pci_find(EDU_VENDOR, EDU_DEVICE, &bdf)) {
        return;                 /* no device: stay silent */
    }
    lo = pci_read(bdf, 0x10);
    base = lo & ~0xfULL;
    if ((lo & 0x6) == 0x4) {
        base |= (u64)pci_read(bdf, 0x14) << 32;
    }
    pci_write(bdf, PCI_COMMAND,
              pci_read(bdf, PCI_COMMAND) | PCI_CMD_MEM | PCI_CMD_MASTER);
    if (!base) {
        printf("EDU-ERR round=0 what=bar0-unassigned arg=0x%x\n", bdf);
        return;
    }
    bar0 = (volatile u8 *)(uptr)base;
    hpet_init();
    id = rd32(EDU_ID);
    printf("EDU found bdf=%02x:%02x.%x bar0=0x%llx id=0x%x hpet_ns=%llu\n",
           bdf >> 8, (bdf >> 3) & 31, bdf & 7, base, id, hpet_ns_per_tick);
    state = IDLE;
}

static void edu_step(void)
{
    u64 now;

    if (state == ABSENT) {
        return;
    }
    now = now_ms();
    if (state == IDLE) {
        round_no++;
        for (u64 i = 0; i < DMA_BYTES / 8; i++) {
            ((volatile u64 *)src_page)[i] = fill(i);
        }
        start((u64)(uptr)src_page, EDU_BUF, EDU_CMD_RUN);
        last_poll_ms = now;
        state = TO_DEVICE;
        return;
    }
    if (now == last_poll_ms) {
        return;                 /* poll the device at most once per ms */
    }
    last_poll_ms = now;
    if (rd64(EDU_DMA_CMD) & EDU_CMD_RUN) {
        if (now - started_ms > DMA_TIMEOUT_MS) {
            fail(state == TO_DEVICE ? "timeout-to-device" : "timeout-to-ram",
                 rd64(EDU_DMA_CMD));
        }
        return;
    }
    finished++;
    last_dur_us = hpet ? hpet_us() - started_us : 0;
    if (state == TO_DEVICE) {
        for (u64 i = 0; i < DMA_BYTES / 8; i++) {
            ((volatile u64 *)dst_page)[i] = 0;
        }
        start(EDU_BUF, (u64)(uptr)dst_page, EDU_CMD_RUN | EDU_CMD_TO_RAM);
        state = TO_RAM;
        return;
    }
    /* TO_RAM finished: the round trip must have carried this round's data */
    for (u64 i = 0; i < DMA_BYTES / 8; i++) {
        u64 got = ((volatile u64 *)dst_page)[i];

        if (got != fill(i)) {
            printf("EDU-ERR round=%llu what=mismatch word=%llu expected=0x%llx "
                   "got=0x%llx\n", round_no, i, fill(i), got);
            done_err++;
            state = IDLE;
            return;
        }
    }
    done_ok++;
    state = IDLE;
}

static void edu_report(void)
{
    if (state != ABSENT) {
        printf(" dma=%llu dma_err=%llu dma_iss=%llu dma_fin=%llu dma_dur_us=%llu",
               done_ok, done_err, issued, finished, last_dur_us);
    }
}

const struct task edu_task = {
    .name = "edu",
    .init = edu_init,
    .step = edu_step,
    .report = edu_report,
};
