/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * sealvm test guest: the mtty serial-port exerciser.
 *
 * mtty (Linux samples/vfio-mdev/mtty.c) is an mdev whose BAR0 is an I/O
 * region holding a 16550-style UART with a 16-byte loopback FIFO: bytes
 * written to THR come back from RBR.  It supports VFIO migration: its
 * device state is the UART registers and the FIFO contents.  Assigned to
 * this guest, it shows whether that state survives a live update
 * untouched (cpr-exec, cpr-transfer: the same device, never stopped) or
 * is carried over (normal migration to another mtty instance).
 *
 * The task finds the device on PCI, enables I/O decoding, programs the
 * line (9600 baud divisor, 8E1, DTR|RTS, FIFO on, no interrupts), and then
 * alternates, at most one phase per millisecond of guest time:
 *
 *   send:  check LCR/MCR/SCR still hold what was programmed, write
 *          SCR = round number, write N bytes unique to the round to THR
 *   recv:  check LSR says data ready, read N bytes from RBR, compare,
 *          check LSR says empty again (nothing lost, nothing extra)
 *
 * Between the two phases the bytes sit in the device's FIFO, so a live
 * update always finds data in flight.  A device that was reset, recreated
 * without its state, or given a stale state fails the next check.
 *
 * Serial output, only when an mtty device is present:
 *   MTTY found bdf=BB:DD.F io=0x... lcr=0x.. mcr=0x..   at init
 *   MTTY-ERR round=<n> what=<...> ...                   on each failure
 *   heartbeat fields: mtty=<rounds verified> mtty_err=<failures>
 */
#include "guest.h"

#define MTTY_VENDOR     0x4348
#define MTTY_DEVICE     0x3253

#define UART_RX         0       /* in, DLAB=0 */
#define UART_TX         0       /* out, DLAB=0 */
#define UART_DLL        0       /* DLAB=1 */
#define UART_IER        1
#define UART_DLM        1       /* DLAB=1 */
#define UART_FCR        2       /* out */
#define UART_LCR        3
#define UART_MCR        4
#define UART_LSR        5
#define UART_SCR        7

#define LSR_DR          0x01
#define LSR_THRE        0x20
#define LSR_TEMT        0x40
#define LCR_DLAB        0x80
#define LCR_8E1         0x1b    /* 8 bits, even parity, 1 stop bit */
#define MCR_DTR_RTS     0x03
#define FCR_ENABLE_CLR  0x07    /* FIFO on, clear both FIFOs */
#define DIVISOR_9600    12

#define BYTES_PER_ROUND 8       /* half the FIFO */

#define PCI_COMMAND     0x04
#define PCI_CMD_IO      0x1

enum state { ABSENT, SEND, RECV };

static enum state state = ABSENT;
static u16 io;
static u64 round_no, done_ok, done_err, last_ms;

static u8 byte_of(u64 round, u32 i)
{
    return (u8)((round * 0x9E3779B1u) >> 11 ^ (i * 0x3B) ^ 0xA5);
}

/* Line settings, an empty FIFO, SCR = the round number. */
static void program(void)
{
    outb(io + UART_IER, 0);                 /* polled: no interrupts */
    outb(io + UART_LCR, LCR_DLAB);
    outb(io + UART_DLL, DIVISOR_9600 & 0xff);
    outb(io + UART_DLM, DIVISOR_9600 >> 8);
    outb(io + UART_LCR, LCR_8E1);
    outb(io + UART_FCR, FCR_ENABLE_CLR);
    outb(io + UART_MCR, MCR_DTR_RTS);
    outb(io + UART_SCR, (u8)round_no);
}

/* One failure: report it, then start over (reprogrammed, FIFO empty). */
static void fail(const char *what, u32 expected, u32 got)
{
    done_err++;
    printf("MTTY-ERR round=%llu what=%s expected=0x%x got=0x%x\n", round_no, what,
           expected, got);
    program();
    state = SEND;
}

static int reg_is(u16 reg, u8 expected, const char *what)
{
    u8 got = inb(io + reg);

    if (got != expected) {
        fail(what, expected, got);
        return 0;
    }
    return 1;
}

static void mtty_init(void)
{
    u32 bdf, bar;

    if (!pci_find(MTTY_VENDOR, MTTY_DEVICE, &bdf)) {
        return;                 /* no device: stay silent */
    }
    bar = pci_read(bdf, 0x10);
    if (!(bar & 1) || !(bar & ~3u)) {
        printf("MTTY-ERR round=0 what=bar0-not-io expected=0x1 got=0x%x\n", bar);
        return;
    }
    io = (u16)(bar & ~3u);
    pci_write(bdf, PCI_COMMAND, pci_read(bdf, PCI_COMMAND) | PCI_CMD_IO);
    program();
    printf("MTTY found bdf=%02x:%02x.%x io=0x%x lcr=0x%x mcr=0x%x\n", bdf >> 8,
           (bdf >> 3) & 31, bdf & 7, io, inb(io + UART_LCR), inb(io + UART_MCR));
    state = SEND;
}

static void mtty_step(void)
{
    u64 now;
    u8 lsr;

    if (state == ABSENT) {
        return;
    }
    now = now_ms();
    if (now == last_ms) {
        return;                 /* one phase per ms: keep the heartbeat on time */
    }
    last_ms = now;
    if (state == SEND) {
        if (!reg_is(UART_LCR, LCR_8E1, "lcr") || !reg_is(UART_MCR, MCR_DTR_RTS, "mcr") ||
            !reg_is(UART_SCR, (u8)round_no, "scr")) {
            return;
        }
        round_no++;
        outb(io + UART_SCR, (u8)round_no);
        for (u32 i = 0; i < BYTES_PER_ROUND; i++) {
            outb(io + UART_TX, byte_of(round_no, i));
        }
        state = RECV;
        return;
    }
    lsr = inb(io + UART_LSR);
    if (!(lsr & LSR_DR)) {
        fail("lsr-no-data", LSR_DR, lsr);
        return;
    }
    for (u32 i = 0; i < BYTES_PER_ROUND; i++) {
        u8 got = inb(io + UART_RX);

        if (got != byte_of(round_no, i)) {
            fail("data", byte_of(round_no, i), got);
            return;
        }
    }
    lsr = inb(io + UART_LSR);
    if ((lsr & (LSR_DR | LSR_THRE | LSR_TEMT)) != (LSR_THRE | LSR_TEMT)) {
        fail("lsr-not-empty", LSR_THRE | LSR_TEMT, lsr);
        return;
    }
    done_ok++;
    state = SEND;
}

static void mtty_report(void)
{
    if (state != ABSENT) {
        printf(" mtty=%llu mtty_err=%llu", done_ok, done_err);
    }
}

const struct task mtty_task = {
    .name = "mtty",
    .init = mtty_init,
    .step = mtty_step,
    .report = mtty_report,
};
