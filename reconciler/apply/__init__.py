"""The only layer that changes the host: runs a Plan's steps through narrow adapters.

Every step re-checks the world before acting (so re-running an interrupted apply is safe) and refuses
anything destructive that the re-check does not confirm (no shrink, no delete of a disk we did not create,
no signal to a PID that is not our QEMU).
"""
