"""Errors of the executor layer, by behaviour."""


class StepFailed(Exception):
    """A step could not be carried out; the message says why, in terms a person can act on.

    The executor stops the VM's remaining steps (they depend on this one) and goes on with other VMs.
    """
