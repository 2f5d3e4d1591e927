"""Narrow adapters to the host shared by the observers (queries) and the executor (commands): the QMP
monitor (``qmp``), /proc (``procfs``) and ``qemu-img`` (``qemu_img``). They hold no policy."""
