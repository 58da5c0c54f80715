# dirty: rewrites the first word of every page of the work range, pass after pass.
#   pass P (1, 2, ...) writes (A + P) into the page at address A.
#   arg = number of passes; 0 means "forever" (a workload for live migration and dirty tracking).
# After the last pass it reports the pass count, then the checksum of the final contents
# (the wrapping sum of A + passes over the range), and exits 0.
.include "common.inc"
.global _start
_start:
    STARTED
    mov r12, rdx             # r12 = passes wanted (0 = forever)
    xor r13, r13             # r13 = passes done
next_pass:
    inc r13
    mov r8, rdi              # r8 = address of the current page
    mov r9, rsi              # r9 = pages left
    test r9, r9
    jz pass_done
next_page:
    lea rax, [r8 + r13]
    mov [r8], rax
    add r8, PAGE_SIZE
    dec r9
    jnz next_page
pass_done:
    cmp r13, r12
    jne next_pass            # with r12 = 0 this never matches: run forever
    # Checksum of what is now in memory.
    SUM_FIRST_WORDS
    REPORT r13
    REPORT r11
    EXIT 0
