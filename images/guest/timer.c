/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * sealvm test guest: interrupt table, legacy PIC and PIT.
 *
 * The PIT runs at ~1 kHz on IRQ0 and counts ticks; everything else that
 * needs time reads now_ms().  The PIT runs on QEMU's virtual clock, which
 * stops while the VM is paused: the guest cannot see a pause in its own
 * clock, only the host can (by the heartbeat's arrival times).
 */
#include "guest.h"

#define PIT_HZ      1193182ULL
#define PIT_DIVISOR 1193ULL

struct interrupt_frame;

struct idt_entry {
    u16 off0;
    u16 sel;
    u8 ist;
    u8 type;
    u16 off1;
    u32 off2;
    u32 zero;
} __attribute__((packed));

static struct idt_entry idt[48] __attribute__((aligned(16)));
static volatile u64 ticks;

void panic(const char *why)
{
    __asm__ volatile("cli");
    printf("PANIC %s\n", why);
    for (;;) {
        __asm__ volatile("hlt");
    }
}

u64 now_ms(void)
{
    return ticks * PIT_DIVISOR * 1000 / PIT_HZ;
}

__attribute__((interrupt)) static void irq_timer(struct interrupt_frame *f)
{
    (void)f;
    ticks++;
    outb(0x20, 0x20);
}

__attribute__((interrupt)) static void irq_other(struct interrupt_frame *f)
{
    (void)f;
    outb(0xA0, 0x20);
    outb(0x20, 0x20);
}

static void exception(unsigned vec, u64 rip, u64 code)
{
    u64 cr2;

    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    printf("EXCEPTION vec=%u rip=0x%llx code=0x%llx cr2=0x%llx\n",
           vec, rip, code, cr2);
    panic("unexpected exception");
}

/* The frame starts with RIP; error-code vectors get the code separately. */
#define EXC(n) \
    __attribute__((interrupt)) static void exc##n(struct interrupt_frame *f) \
    { exception(n, *(u64 *)f, 0); }
#define EXC_CODE(n) \
    __attribute__((interrupt)) static void exc##n(struct interrupt_frame *f, \
                                                  u64 code) \
    { exception(n, *(u64 *)f, code); }

EXC(0) EXC(1) EXC(2) EXC(3) EXC(4) EXC(5) EXC(6) EXC(7)
EXC_CODE(8) EXC(9) EXC_CODE(10) EXC_CODE(11) EXC_CODE(12) EXC_CODE(13)
EXC_CODE(14) EXC(15) EXC(16) EXC_CODE(17) EXC(18) EXC(19)

static void set_gate(unsigned vec, void *handler)
{
    u64 a = (u64)handler;

    idt[vec].off0 = (u16)a;
    idt[vec].sel = 0x08;
    idt[vec].ist = 0;
    idt[vec].type = 0x8E;       /* present, interrupt gate */
    idt[vec].off1 = (u16)(a >> 16);
    idt[vec].off2 = (u32)(a >> 32);
    idt[vec].zero = 0;
}

void timer_init(void)
{
    static void *const exc[] = {
        exc0, exc1, exc2, exc3, exc4, exc5, exc6, exc7, exc8, exc9,
        exc10, exc11, exc12, exc13, exc14, exc15, exc16, exc17, exc18, exc19,
    };
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) desc = { sizeof(idt) - 1, (u64)idt };
    unsigned i;

    for (i = 0; i < 48; i++) {
        set_gate(i, i < 20 ? exc[i] : (void *)irq_other);
    }
    set_gate(32, (void *)irq_timer);
    __asm__ volatile("lidt %0" : : "m"(desc));

    /* PIC: remap to 32..47, only IRQ0 unmasked. */
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 32);
    outb(0xA1, 40);
    outb(0x21, 4);
    outb(0xA1, 2);
    outb(0x21, 1);
    outb(0xA1, 1);
    outb(0x21, 0xFE);
    outb(0xA1, 0xFF);

    /* PIT channel 0, mode 2, ~1 kHz. */
    outb(0x43, 0x34);
    outb(0x40, (u8)PIT_DIVISOR);
    outb(0x40, (u8)(PIT_DIVISOR >> 8));
    __asm__ volatile("sti");
}
