"""Infinization: a declarative, GitOps-style reconciler for QEMU virtual machines.

Data flows one way: manifests -> desired model (``spec``) -> with the observed state (``observe``)
-> plan (``plan``, pure) -> executor (``apply``) -> host. ``cli`` and ``runtime`` drive it.
"""

__version__ = "0.1.0"
