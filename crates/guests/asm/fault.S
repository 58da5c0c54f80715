# fault: deliberately breaks the CPU: loads an empty IDT and divides by zero, which escalates
# to a triple fault. The VMM must report this as a guest crash, not hang or succeed.
.include "common.inc"
.global _start
_start:
    STARTED
    lidt [empty_idt]
    xor ecx, ecx
    mov eax, 1
    div ecx
    EXIT 99                  # not reached
empty_idt:
    .word 0
    .quad 0
