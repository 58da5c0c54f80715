# checksum: reads the first word of every page of the work range and reports their wrapping sum.
# Touches each page exactly once, read-only: the pattern for "restore, then read everything".
.include "common.inc"
.global _start
_start:
    STARTED
    mov r8, rdi              # r8 = address of the current page
    mov r9, rsi              # r9 = pages left
    xor r11, r11             # r11 = checksum
    test r9, r9
    jz done
next_page:
    add r11, [r8]
    add r8, PAGE_SIZE
    dec r9
    jnz next_page
done:
    REPORT r11
    EXIT 0
