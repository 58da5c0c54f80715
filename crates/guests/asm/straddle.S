# straddle: one 8-byte store that straddles two pages: arg is written at the last 4 bytes of
# the first page of the work range and the first 4 of the next (KVM splits an emulated access
# like that in two when both pages exit to user space). Then it reads the word back, reports
# it, and exits 0.
.include "common.inc"
.global _start
_start:
    STARTED
    lea r8, [rdi + PAGE_SIZE - 4]
    mov [r8], rdx
    mov r9, [r8]
    REPORT r9
    EXIT 0
