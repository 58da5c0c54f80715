# scatter: reads the first word of arg pages spread evenly over the work range (every
# (pages / arg)-th page, from the first) and reports their wrapping sum. A restore benchmark's
# workload: a fixed, scattered working set that a lazy restore must fault in page by page.
#   arg = pages to read (0 or more than the range: every page).
.include "common.inc"
.global _start
_start:
    STARTED
    mov r9, rdx              # r9 = pages to read
    test r9, r9
    jz all_pages
    cmp r9, rsi
    jbe stride
all_pages:
    mov r9, rsi
stride:
    xor r11, r11             # r11 = sum
    test r9, r9
    jz done
    mov rax, rsi             # r10 = stride in bytes = (range pages / pages to read) * PAGE_SIZE
    xor edx, edx
    div r9
    shl rax, 12
    mov r10, rax
    mov r8, rdi              # r8 = address of the current page
next_page:
    add r11, [r8]
    add r8, r10
    dec r9
    jnz next_page
done:
    REPORT r11
    EXIT 0
