# hello: reports the constant HELLO_REPORT ("faultln!" in ASCII, little-endian) and exits 0.
# The smallest possible check that the VMM can enter a guest and hear from it.
.include "common.inc"
.global _start
_start:
    STARTED
    mov rbx, 0x216e6c746c756166
    REPORT rbx
    EXIT 0
