"""Pure translation of desired VMs into QEMU command lines. No I/O."""
