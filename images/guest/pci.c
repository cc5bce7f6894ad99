/* SPDX-License-Identifier: GPL-2.0-or-later */
/* sealvm test guest: PCI configuration space (mechanism #1) for the device tasks. */
#include "guest.h"

u32 pci_read(u32 bdf, u32 off)
{
    outl(0xcf8, 0x80000000u | (bdf << 8) | (off & 0xfc));
    return inl(0xcfc);
}

void pci_write(u32 bdf, u32 off, u32 v)
{
    outl(0xcf8, 0x80000000u | (bdf << 8) | (off & 0xfc));
    outl(0xcfc, v);
}

int pci_find(u16 vendor, u16 device, u32 *bdf_out)
{
    u32 want = (u32)device << 16 | vendor;

    for (u32 bus = 0; bus < 256; bus++) {
        for (u32 dev = 0; dev < 32; dev++) {
            u32 bdf = (bus << 8) | (dev << 3);
            u32 id = pci_read(bdf, 0);
            u32 fns;

            if ((id & 0xffff) == 0xffff) {
                continue;
            }
            fns = (pci_read(bdf, 0x0c) >> 16) & 0x80 ? 8 : 1;
            for (u32 fn = 0; fn < fns; fn++) {
                if (pci_read(bdf | fn, 0) == want) {
                    *bdf_out = bdf | fn;
                    return 1;
                }
            }
        }
    }
    return 0;
}
