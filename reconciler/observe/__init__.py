"""Read-only adapters that build the observed-state snapshot (/proc, QMP queries, ``qemu-img info -U``).

Nothing here changes the host. The executor reuses ``monitor`` to send its commands, but observers only
ever query.
"""
