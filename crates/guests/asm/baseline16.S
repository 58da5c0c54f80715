# baseline16: the smallest guest the boot benchmark's "bare KVM" baseline can run: 16-bit real
# mode, no page tables, no stack. It says STARTED and exits 0. Position independent, loaded by
# the benchmark at any address. Not a micro-guest: `faultline run` cannot start it.
.include "common.inc"
.code16
.global _start
_start:
    mov dx, PORT_STARTED
    out dx, al
    mov dx, PORT_EXIT
    xor eax, eax
    out dx, eax
    hlt
