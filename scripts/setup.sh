#!/usr/bin/env bash
# Install everything Infinization needs on a Debian 12 host, as root, idempotently:
# QEMU and tools from Debian, a virtualenv with the package (editable, with test tools),
# the `infinization` command on PATH, the cached test/demo guest and the Debian root filesystem of the
# slow guest-agent tests (scripts/build-rootfs.sh).
#
#   INFZ_VENV   where the virtualenv goes   (default /opt/infinization/venv)
#   PYTHON      the Python >= 3.11 to use   (default python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${INFZ_VENV:-/opt/infinization/venv}
PYTHON=${PYTHON:-python3}
PACKAGES=(qemu-system-x86 qemu-utils ovmf swtpm swtpm-tools busybox-static cpio nftables iproute2 dnsmasq-base postgresql git
          iputils-ping util-linux xz-utils zsh prometheus mmdebstrap e2fsprogs debian-archive-keyring
          systemd systemd-container
          isolinux syslinux syslinux-common mtools dosfstools grub-efi-amd64-bin grub-common
          python3 python3-venv python3-pip ca-certificates)

log() { echo "setup: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: run as root (it installs Debian packages and manages VMs)" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
log "installing infinization into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e "$ROOT[test,dev]"
ln -sf "$VENV/bin/infinization" /usr/local/bin/infinization

# QEMU runs as this unprivileged user (HostConfig.qemuUser; set INFZ_QEMU_USER when the host's
# config names another one): a system user and group, no home, no login shell.
QEMU_USER=${INFZ_QEMU_USER:-infinization-qemu}
if ! getent passwd "$QEMU_USER" >/dev/null; then
    log "creating the system user $QEMU_USER (QEMU runs as it)"
    getent group "$QEMU_USER" >/dev/null || groupadd --system "$QEMU_USER"
    useradd --system --gid "$QEMU_USER" --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$QEMU_USER"
fi
# KVM: /dev/kvm is root:kvm 0660 on Debian; QEMU keeps only the groups the host gives its user.
if getent group kvm >/dev/null && ! id -nG "$QEMU_USER" | tr ' ' '\n' | grep -qx kvm; then
    log "adding $QEMU_USER to the kvm group (for /dev/kvm)"
    usermod -a -G kvm "$QEMU_USER"
fi
# The host policy: what manifests may use on this host. Written once, commented; never overwritten.
CONFIG=/etc/infinization/config.yaml
install -d -m 0755 /etc/infinization
install -d -m 0755 /var/lib/infinization
install -d -m 0755 /var/lib/infinization/images
install -d -m 0700 /etc/infinization/secrets
if [ ! -e "$CONFIG" ]; then
    log "writing the default host policy $CONFIG"
    umask 022
    cat >"$CONFIG.partial" <<'YAML'
# Infinization host policy: what manifests may use on this host (manifest authors cannot change it).
# Read by `infinization` and the sync daemon from here, or from --config FILE / $INFINIZATION_CONFIG.
# Every value below is the built-in default; edit to taste.

# Where a manifest's disk images, CD-ROM images, kernels and initrds may come from. A path must resolve,
# after symlinks, to a regular file inside one of these (and not into the state directory).
storageRoots:
  - /var/lib/infinization/images
  - /var/cache/infinization          # the bundled demo guest's kernel and initrd

# Where firmware files may come from.
firmwareDirs: [/usr/share/OVMF, /usr/share/qemu, /usr/share/seabios, /usr/share/edk2/ovmf]

# The unprivileged user QEMU runs as, and the QEMU binary a VM's process must be.
qemuUser: infinization-qemu
qemuBinary: /usr/bin/qemu-system-x86_64

# Host ports a user-mode NIC's portForwards may bind (never below 1024).
portForwardRange: "10000-20000"

# Ports a VM's display (VNC, SPICE) may listen on: port: auto takes a free one, kept for the VM across
# restarts; a fixed port must be in the range too. Not below 5900 (QEMU's VNC counts displays from 5900).
displayPortRange: "5900-5999"

# Where a display's passwordFile may be (after symlinks). The file must be root's, mode 0600 or 0400;
# the reconciler reads it and sets the password over QMP (never on QEMU's command line).
secretDirs: [/etc/infinization/secrets]
# Host device passthrough (spec.hostDevices): none unless listed here. PCI functions by address (every member
# of their IOMMU groups must be listed too: the whole group goes to the VM), USB devices by vendor:product.
pciPassthrough: []            # e.g. ["0000:01:00.0", "0000:01:00.1"]
usbPassthrough: []            # e.g. ["1050:0407"]
# Drivers a passed-through function (or a member of its group) may be unbound from; bound to any other, or
# backing a network interface or block device, it is refused as in use by the host.
vfioUnbindDrivers: [snd_hda_intel, xhci_hcd, ehci-pci, ohci-pci, pci-stub]
# sysfsRoot: /sys             # where sysfs is (tests point it at a fake tree); devRoot: /dev
# VMs with memory.hugepages: the executor mounts a private hugetlbfs per page size here (2M, 1G), owned by
# qemuUser, mode 0700. The pages come from the host's pool: echo N > /proc/sys/vm/nr_hugepages (or hugepages=N
# on the kernel command line); a VM that needs more than are free is refused at plan time.
hugepagesDir: /run/infinization/hugepages

# required: a pinned VM's QEMU gets a cpuset cgroup of its own, and a host without the cpuset controller
# refuses pinned VMs at plan time. off: pin threads (sched_setaffinity) without a cgroup.
cpusetCgroup: required
YAML
    mv "$CONFIG.partial" "$CONFIG"
fi

log "building the guest (cached)"
bash "$ROOT/scripts/build-guest.sh" /var/cache/infinization/guest
log "building the Debian 12 root filesystem of the guest-agent tests (cached; ~1.5 min cold)"
bash "$ROOT/scripts/build-rootfs.sh" /var/cache/infinization/rootfs

# The service: the unit (replaced at each setup; settings go in /etc/default/infinization-sync or a
# drop-in) and the manifests it manages, the bundled demo, copied once (then they are the operator's).
MANIFESTS=/opt/infinization/manifests
if [ ! -d "$MANIFESTS" ]; then
    log "installing the demo manifests into $MANIFESTS (managed by infinization-sync.service)"
    install -d -m 0755 "$MANIFESTS"
    # The editor modeline points at the schema installed beside it (the relative one is the repository's).
    install -d -m 0755 /opt/infinization/schema
    install -m 0644 "$ROOT/docs/schema/manifest.schema.json" /opt/infinization/schema/
    sed 's#\$schema=\.\./docs/schema/#$schema=/opt/infinization/schema/#' "$ROOT/manifests/demo.yaml" \
        >"$MANIFESTS/demo.yaml"
    chmod 0644 "$MANIFESTS/demo.yaml"
fi
if [ -d /etc/systemd/system ]; then
    install -m 0644 "$ROOT/examples/08-systemd-unit/infinization-sync.service" /etc/systemd/system/
    if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
    log "installed infinization-sync.service (not enabled: systemctl enable --now infinization-sync)"
fi
log "done: $("$VENV/bin/infinization" --version)"
