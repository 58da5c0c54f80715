# asyncpf: enables KVM paravirtual async page faults the way a Linux guest does
# (arch/x86/kernel/kvm.c, kvm_guest_cpu_init):
#   1. MSR_KVM_ASYNC_PF_INT (0x4b564d06) = the "page ready" interrupt vector,
#   2. MSR_KVM_ASYNC_PF_EN  (0x4b564d02) = physical address of a 64-byte-aligned
#      struct kvm_vcpu_pv_apf_data | ENABLED (bit 0) | DELIVERY_AS_INT (bit 3).
# The area is the first page of the work range. It reads both MSRs back, reports them and
# exits 0; the VMM can then read them with KVM_GET_MSRS.
.include "common.inc"
.set MSR_KVM_ASYNC_PF_EN,  0x4b564d02
.set MSR_KVM_ASYNC_PF_INT, 0x4b564d06
.set ASYNC_PF_VECTOR,      0xf3      # Linux's HYPERVISOR_CALLBACK_VECTOR
.set KVM_ASYNC_PF_ENABLED,         1
.set KVM_ASYNC_PF_DELIVERY_AS_INT, 8
.global _start
_start:
    STARTED
    mov r12, rdi             # r12 = the async-PF data area
    mov ecx, MSR_KVM_ASYNC_PF_INT
    mov eax, ASYNC_PF_VECTOR
    xor edx, edx
    wrmsr
    mov rax, r12
    or rax, KVM_ASYNC_PF_ENABLED | KVM_ASYNC_PF_DELIVERY_AS_INT
    mov rdx, rax
    shr rdx, 32
    mov ecx, MSR_KVM_ASYNC_PF_EN
    wrmsr
    # Read both back, as 64-bit values in r13 (INT) and r14 (EN).
    mov ecx, MSR_KVM_ASYNC_PF_INT
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov r13, rax
    mov ecx, MSR_KVM_ASYNC_PF_EN
    rdmsr
    shl rdx, 32
    or rax, rdx
    mov r14, rax
    REPORT r13
    REPORT r14
    EXIT 0
