# counter: QEMU's migration test guest, in a word: pass after pass, adds 1 to the first word of
# every page of the work range, in address order. At any instant the pages hold one value up to
# the page being written and that value less one after it, so memory copied by a migration at
# any point must show one value, or two that differ by one at a single edge (see
# guests::counter_check): a page copied before a write it missed breaks that.
#   arg = number of passes; 0 means "forever".
# After each pass it announces hold point P (the passes done). After the last pass it reports
# the pass count, then the wrapping sum of the first words of the range, and exits 0.
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
    inc qword ptr [r8]
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
