# timedtouch: like touch (page at A gets A xor arg; reports the sum), and also measures each
# first write: it reads the TSC before and after the write and stores the difference (in TSC
# ticks) in the page's second word. For a page that is not there yet, that is the whole fault:
# exit to the host, fetch, install, resume. The host reads the deltas back from guest memory.
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
    rdtsc                    # edx:eax = TSC before the write
    shl rdx, 32
    or rax, rdx
    mov r12, rax
    mov rax, r8
    xor rax, r10
    mov [r8], rax            # the first touch of the page
    add r11, rax
    rdtsc                    # TSC after
    shl rdx, 32
    or rax, rdx
    sub rax, r12
    mov [r8 + 8], rax        # store the delta in the page itself
    add r8, PAGE_SIZE
    dec r9
    jnz next_page
done:
    REPORT r11
    EXIT 0
