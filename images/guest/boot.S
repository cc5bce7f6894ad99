/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * sealvm test guest: multiboot entry, 32-bit -> long mode, identity map.
 *
 * QEMU's multiboot loader refuses x86-64 ELF images, so the image is a flat
 * binary whose multiboot header carries its load addresses (flag bit 16).
 * The first 64 GiB are identity-mapped with 2 MiB pages.
 */
#define MB_MAGIC        0x1BADB002
#define MB_FLAGS        0x00010003      /* page align, memory info, addresses */
#define MAP_GIB         64

        .section .multiboot, "a"
        .code32
        .align 4
mb_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)
        .long mb_header                 /* header_addr */
        .long __image_start             /* load_addr */
        .long __load_end                /* load_end_addr */
        .long __bss_end                 /* bss_end_addr */
        .long _start32                  /* entry_addr */

        .text
        .code32
        .globl _start32
_start32:
        cli
        mov     %eax, %esi              /* multiboot magic */
        mov     %ebx, %edi              /* multiboot info */
        mov     $stack_top, %esp

        /* PML4[0] -> PDPT; PDPT[i] -> PD i; PD entries: 2 MiB pages. */
        mov     $pdpt, %eax
        or      $0x3, %eax
        mov     %eax, pml4
        movl    $0, pml4 + 4

        xor     %ecx, %ecx
1:      mov     %ecx, %eax
        shl     $12, %eax
        add     $pds, %eax
        or      $0x3, %eax
        mov     %eax, pdpt(, %ecx, 8)
        movl    $0, pdpt + 4(, %ecx, 8)
        inc     %ecx
        cmp     $MAP_GIB, %ecx
        jne     1b

        xor     %ecx, %ecx              /* entry index over all PDs */
2:      mov     %ecx, %eax
        shl     $21, %eax               /* low 32 bits of ecx * 2 MiB */
        or      $0x83, %eax             /* present, writable, 2 MiB */
        mov     %ecx, %edx
        shr     $11, %edx               /* high bits of ecx * 2 MiB */
        mov     %eax, pds(, %ecx, 8)
        mov     %edx, pds + 4(, %ecx, 8)
        inc     %ecx
        cmp     $(MAP_GIB * 512), %ecx
        jne     2b

        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     %cr4, %eax
        or      $(1 << 5), %eax         /* PAE */
        mov     %eax, %cr4
        mov     $0xC0000080, %ecx       /* EFER */
        rdmsr
        or      $(1 << 8), %eax         /* LME */
        wrmsr
        mov     %cr0, %eax
        or      $0x80000001, %eax       /* PG | PE */
        mov     %eax, %cr0
        lgdt    gdt_desc
        ljmp    $0x08, $_start64

        .code64
_start64:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        xor     %ax, %ax
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $stack_top, %rsp
        /* kmain(magic, info): already in edi/esi order? swap to SysV. */
        mov     %esi, %eax
        mov     %edi, %esi
        mov     %eax, %edi
        call    kmain
3:      hlt
        jmp     3b

        .section .rodata
        .align 16
gdt:
        .quad 0
        .quad 0x00AF9A000000FFFF        /* 0x08: 64-bit code */
        .quad 0x00CF92000000FFFF        /* 0x10: data */
gdt_end:
gdt_desc:
        .word gdt_end - gdt - 1
        .quad gdt

        .section .bss
        .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pds:    .skip 4096 * MAP_GIB
        .align 16
stack:  .skip 65536
stack_top:
