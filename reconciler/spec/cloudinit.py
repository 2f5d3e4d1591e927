"""What a VM's cloud-init NoCloud seed holds (pure): its files, its instance-id and a digest of it all.

``state.files.write_seed`` turns the files into the ISO (volume label ``cidata``); the planner names the
seed by ``seed_digest`` (so a changed user-data or network-config is a new file, and a new medium).
"""

from __future__ import annotations

import hashlib

import yaml

from reconciler.spec.models import CloudInitSpec, secret_digest


def instance_id(vm_name: str, cloud_init: CloudInitSpec) -> str:
    """A stable instance-id from the VM name and the user-data: a changed user-data is a new instance."""
    digest = hashlib.sha256(f"{vm_name}\0{secret_digest(cloud_init.userData)}".encode()).hexdigest()
    return f"iid-{vm_name}-{digest[:16]}"


def seed_files(vm_name: str, cloud_init: CloudInitSpec) -> dict[str, bytes]:
    """user-data (byte-identical to the manifest's), meta-data and, when given, network-config."""
    meta = f"instance-id: {instance_id(vm_name, cloud_init)}\nlocal-hostname: {vm_name}\n"
    files = {"user-data": cloud_init.userData.encode(), "meta-data": meta.encode()}
    if cloud_init.networkConfig is not None:
        files["network-config"] = yaml.safe_dump(cloud_init.networkConfig, sort_keys=False).encode()
    return files


def seed_digest(vm_name: str, cloud_init: CloudInitSpec) -> str:
    """A hash of the seed's content, computable from a plan's redacted user-data too."""
    network = yaml.safe_dump(cloud_init.networkConfig, sort_keys=True) if cloud_init.networkConfig else ""
    return hashlib.sha256(f"{instance_id(vm_name, cloud_init)}\0{network}".encode()).hexdigest()
