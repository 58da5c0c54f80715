# cpuid: reports what the vCPU says about the KVM paravirtual leaves.
#   report 1: ebx of leaf 0x40000000 (first 4 bytes of the "KVMKVMKVM" signature)
#   report 2: eax of leaf 0x40000001 (the KVM feature bits; async PF is bits 4, 10 and 14)
#   report 3: ecx of leaf 1 (standard features, to check a --cpuid-mask)
.include "common.inc"
.global _start
_start:
    STARTED
    mov eax, 0x40000000
    xor ecx, ecx
    cpuid
    mov r12, rbx
    mov eax, 0x40000001
    xor ecx, ecx
    cpuid
    mov r13, rax
    mov eax, 1
    xor ecx, ecx
    cpuid
    mov r14, rcx
    REPORT r12
    REPORT r13
    REPORT r14
    EXIT 0
