# stores: writes known values with stores of every width, for page-tracking tests.
#   arg = stride S in pages (0 counts as 1).
# Two passes; pass P (1, 2) writes the pages whose index i in the range has
# i % S == (P - 1) % S. Into the page at address A it writes V = A * STORES_MULTIPLIER + P:
#   byte [A] = V, word [A + 8] = V, dword [A + 16] = V, qword [A + 24] = V (low bytes each),
#   then `rep stosb` of 3 bytes, each the second byte of V, at A + 48.
# After pass P it announces hold point P. Then it reads the qword at A + 24 of every page of
# the range, reports their wrapping sum, and exits 0.
.include "common.inc"
.set STORES_MULTIPLIER, 0x9e3779b97f4a7c15
.global _start
_start:
    STARTED
    mov r12, rdx             # r12 = stride in pages
    test r12, r12
    jnz have_stride
    mov r12, 1
have_stride:
    mov r10, rdi             # r10 = range start (rdi is the string store's destination)
    mov r9, rsi
    shl r9, 12
    add r9, r10              # r9 = range end
    mov r11, STORES_MULTIPLIER
    mov r15, r12
    shl r15, 12              # r15 = stride in bytes
    mov r13, 1               # r13 = pass
next_pass:
    lea rax, [r13 - 1]
    xor edx, edx
    div r12                  # rdx = (pass - 1) % stride
    shl rdx, 12
    lea r8, [r10 + rdx]      # r8 = first page of this pass
next_page:
    cmp r8, r9
    jae pass_done
    mov rax, r8
    imul rax, r11
    add rax, r13             # rax = V
    mov [r8], al
    mov [r8 + 8], ax
    mov [r8 + 16], eax
    mov [r8 + 24], rax
    shr rax, 8               # al = the second byte of V
    lea rdi, [r8 + 48]
    mov ecx, 3
    rep stosb
    add r8, r15
    jmp next_page
pass_done:
    HOLD r13
    inc r13
    cmp r13, 3
    jne next_pass
    xor r14, r14             # r14 = sum of the qwords at A + 24
    mov r8, r10
sum_page:
    cmp r8, r9
    jae report
    add r14, [r8 + 24]
    add r8, PAGE_SIZE
    jmp sum_page
report:
    REPORT r14
    EXIT 0
