# mix: pass after pass, replaces the first word of every page of the work range by a mix of its
# old value, the page's address and the pass number:
#   pass P (1, 2, ...) turns v at address A into v * 0x5851f42d4c957f2d + (A ^ P).
# Each pass depends on the memory the one before left, so a run that was snapshotted and
# restored finishes with the right result only if memory and registers both came back.
#   arg = number of passes; 0 means "forever".
# After each pass it announces hold point P (the passes done), so that a VMM can hold it at an
# exact pass.
# After the last pass it reports the pass count, then the wrapping sum of the first words of
# the range, and exits 0.
.include "common.inc"
.set MIX_MULTIPLIER, 0x5851f42d4c957f2d
.global _start
_start:
    STARTED
    mov r12, rdx             # r12 = passes wanted (0 = forever)
    xor r13, r13             # r13 = passes done
    mov r14, MIX_MULTIPLIER
next_pass:
    inc r13
    mov r8, rdi              # r8 = address of the current page
    mov r9, rsi              # r9 = pages left
    test r9, r9
    jz pass_done
next_page:
    mov rax, [r8]
    imul rax, r14
    mov r10, r8
    xor r10, r13
    add rax, r10
    mov [r8], rax
    add r8, PAGE_SIZE
    dec r9
    jnz next_page
pass_done:
    HOLD r13
    cmp r13, r12
    jne next_pass            # with r12 = 0 this never matches: run forever
    SUM_FIRST_WORDS
    REPORT r13
    REPORT r11
    EXIT 0
