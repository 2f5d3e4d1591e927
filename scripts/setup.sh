#!/usr/bin/env bash
# Install everything Infinization needs on a Debian 12 host, as root, idempotently:
# QEMU and tools from Debian, a virtualenv with the package (editable, with test tools),
# the `infinization` command on PATH, and the cached test/demo guest.
#
#   INFZ_VENV   where the virtualenv goes   (default /opt/infinization/venv)
#   PYTHON      the Python >= 3.11 to use   (default python3)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${INFZ_VENV:-/opt/infinization/venv}
PYTHON=${PYTHON:-python3}
PACKAGES=(qemu-system-x86 qemu-utils ovmf swtpm swtpm-tools busybox-static cpio nftables iproute2 dnsmasq-base postgresql git
          iputils-ping util-linux xz-utils isolinux syslinux syslinux-common mtools dosfstools grub-efi-amd64-bin grub-common
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
"$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
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
YAML
    mv "$CONFIG.partial" "$CONFIG"
fi

log "building the guest (cached)"
bash "$ROOT/scripts/build-guest.sh" /var/cache/infinization/guest
log "done: $("$VENV/bin/infinization" --version)"
