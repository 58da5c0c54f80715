# The QEMU peer's guest for `faultline bench migrate`: a boot sector in the manner of QEMU's own
# migration test guest. It enters 32-bit protected mode, then adds 1 to the first byte of every
# page from FIRST to LAST (exclusive), pass after pass, writing 'B' to the serial port after
# each pass. With FOREVER = 0 it halts after the first pass (a guest whose pages all hold
# data, idle); otherwise it goes on (a dirtier). The bench patches the three words at
# CONFIG (offset 0x1f0 of the sector) before it boots the image.
.intel_syntax noprefix
.code16
.global _start
_start:
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7c00
    in al, 0x92              # fast A20
    or al, 2
    out 0x92, al
    lgdt [gdt_descriptor]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    ljmp 0x08, offset protected
.code32
protected:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x7c00
next_pass:
    mov esi, [first]
    mov edi, [last]
next_page:
    inc byte ptr [esi]
    add esi, 4096
    cmp esi, edi
    jb next_page
    mov dx, 0x3f8
    mov al, 'B'
    out dx, al
    cmp dword ptr [forever], 0
    jne next_pass
stop:
    hlt
    jmp stop

.p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff     # code: base 0, 4 GiB, 32-bit
    .quad 0x00cf92000000ffff     # data: base 0, 4 GiB
gdt_descriptor:
    .word 23
    .long gdt

.org 0x1f0
first:   .long 0x100000
last:    .long 0x6400000
forever: .long 0
.org 510
.word 0xaa55
