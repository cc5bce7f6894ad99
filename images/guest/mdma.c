/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * sealvm test guest: the mdma heartbeat reader.
 *
 * mdma (images/host/mdma/mdma.c) is a mediated PCI device of the L1 host:
 * a kernel worker there writes a DMA heartbeat into guest RAM every period,
 * pinning the page with vfio_pin_pages() and writing the header with
 * vfio_dma_rw().  The device lives in the host kernel, not in QEMU, so it
 * keeps writing while this guest is paused and while its QEMU is replaced;
 * its timestamps are the host's clock.
 *
 * The task finds the device (1234:d3a1), enables MEM and bus mastering,
 * points it at a buffer in .bss (guest physical = IOVA: no vIOMMU here),
 * starts it, and then, at most once per millisecond of guest time, reads
 * every record the device wrote since last time:
 *
 *   +0   magic "MDMAHB01", seq, ts_ns, period_ns        (header)
 *   +64  ring[n] of { seq, ts_ns }, record s at ring[s % n]
 *
 * Consecutive records give the device's own gap (host ns).  A record the
 * ring overwrote before it was read is counted as lost (no gap measured
 * across it); a slot holding the wrong seq is counted as bad.
 *
 * The period is fixed (PERIOD_MS): 16 KiB of ring hold 20 s of records.
 * Serial output, only when an mdma device is present:
 *   MDMA found bdf=BB:DD.F bar0=0x... buf=0x... len=... period_ms=...
 *   MDMA-ERR what=<...> ...
 *   heartbeat fields: mdma=<last seq seen> mdma_gap_us=<largest gap>
 *     mdma_wgap_us=<largest gap since the previous heartbeat>
 *     mdma_lost=<n> mdma_bad=<n> mdma_dev_err=<device ERRORS register>
 */
#include "guest.h"

#define MDMA_VENDOR     0x1234u
#define MDMA_DEVICE     0xd3a1u
#define MDMA_ID         0x616d646d

#define REG_ID          0x00
#define REG_IOVA_LO     0x08
#define REG_IOVA_HI     0x0c
#define REG_LEN         0x10
#define REG_PERIOD_MS   0x14
#define REG_CTRL        0x18
#define REG_STATUS      0x1c
#define REG_ERRORS      0x24

#define MAGIC           0x31304248414d444dULL   /* "MDMAHB01" */
#define HDR_SIZE        64
#define REC_SIZE        16
#define BUF_SIZE        16384
#define NR_SLOTS        ((BUF_SIZE - HDR_SIZE) / REC_SIZE)
#define PERIOD_MS       20

#define PCI_COMMAND     0x04
#define PCI_CMD_MEM     0x2
#define PCI_CMD_MASTER  0x4

static u8 buf[BUF_SIZE] __attribute__((aligned(4096)));

static volatile u8 *bar0;
static int present;
static u64 last_seq, last_ts, poll_ms;
static u64 gap_ns, wgap_ns, lost, bad;

static u32 rd32(u32 off)
{
    return *(volatile u32 *)(bar0 + off);
}

static void wr32(u32 off, u32 v)
{
    *(volatile u32 *)(bar0 + off) = v;
}

static u64 ld64(u32 off)
{
    return *(volatile u64 *)(buf + off);
}

static void mdma_init(void)
{
    u32 bdf, id;
    u64 base, iova = (u64)(uptr)buf;

    if (!pci_find(MDMA_VENDOR, MDMA_DEVICE, &bdf)) {
        return;
    }
    base = pci_read(bdf, 0x10) & ~0xfULL;
    pci_write(bdf, PCI_COMMAND,
              pci_read(bdf, PCI_COMMAND) | PCI_CMD_MEM | PCI_CMD_MASTER);
    if (!base) {
        printf("MDMA-ERR what=bar0-unassigned bdf=0x%x\n", bdf);
        return;
    }
    bar0 = (volatile u8 *)(uptr)base;
    id = rd32(REG_ID);
    if (id != MDMA_ID) {
        printf("MDMA-ERR what=id got=0x%x\n", id);
        return;
    }
    memset(buf, 0, sizeof(buf));
    wr32(REG_IOVA_LO, (u32)iova);
    wr32(REG_IOVA_HI, (u32)(iova >> 32));
    wr32(REG_LEN, BUF_SIZE);
    wr32(REG_PERIOD_MS, PERIOD_MS);
    wr32(REG_CTRL, 1);
    printf("MDMA found bdf=%02x:%02x.%x bar0=0x%llx buf=0x%llx len=%u "
           "period_ms=%u status=0x%x\n", bdf >> 8, (bdf >> 3) & 31, bdf & 7,
           base, iova, BUF_SIZE, PERIOD_MS, rd32(REG_STATUS));
    present = 1;
}

static void consume(u64 seq)
{
    u64 first = last_seq + 1;

    if (seq - last_seq > NR_SLOTS) {
        /* overwritten before we looked: no gap across the hole */
        first = seq - NR_SLOTS + 1;
        lost += first - last_seq - 1;
        last_ts = 0;
    }
    for (u64 s = first; s <= seq; s++) {
        u32 off = HDR_SIZE + (u32)(s % NR_SLOTS) * REC_SIZE;
        u64 rs = ld64(off), ts = ld64(off + 8);

        if (rs != s) {
            bad++;
            last_ts = 0;
            continue;
        }
        if (last_ts) {
            u64 gap = ts - last_ts;

            if (gap > gap_ns) {
                gap_ns = gap;
            }
            if (gap > wgap_ns) {
                wgap_ns = gap;
            }
        }
        last_ts = ts;
    }
    last_seq = seq;
}

static void mdma_step(void)
{
    u64 now, seq;

    if (!present) {
        return;
    }
    now = now_ms();
    if (now == poll_ms) {
        return;
    }
    poll_ms = now;
    if (ld64(0) != MAGIC) {
        return;                 /* nothing written yet */
    }
    seq = ld64(8);
    if (seq > last_seq) {
        consume(seq);
    }
}

static void mdma_report(void)
{
    if (!present) {
        return;
    }
    printf(" mdma=%llu mdma_gap_us=%llu mdma_wgap_us=%llu mdma_lost=%llu "
           "mdma_bad=%llu mdma_dev_err=%u", last_seq, gap_ns / 1000,
           wgap_ns / 1000, lost, bad, rd32(REG_ERRORS));
    wgap_ns = 0;
}

const struct task mdma_task = {
    .name = "mdma",
    .init = mdma_init,
    .step = mdma_step,
    .report = mdma_report,
};
