# touch: writes one word into every page of the work range and reports a checksum.
#   page at address A gets the value (A xor arg); the report is the wrapping sum of the values.
# The host can recompute the same sum from guest memory afterwards.
.include "common.inc"
.global _start
_start:
    STARTED
    mov r8, rdi              # r8 = address of the current page
    mov r9, rsi              # r9 = pages left
    mov r10, rdx             # r10 = seed (arg)
    xor r11, r11             # r11 = checksum
    test r9, r9
    jz done
next_page:
    mov rax, r8
    xor rax, r10
    mov [r8], rax
    add r11, rax
    add r8, PAGE_SIZE
    dec r9
    jnz next_page
done:
    REPORT r11
    EXIT 0
