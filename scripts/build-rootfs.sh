#!/bin/bash
# Build Infinization's small real-OS test guest: a Debian 12 root filesystem (systemd, udev, systemd-networkd,
# qemu-guest-agent) made with mmdebstrap from Debian's archive, as a qcow2 disk image plus the kernel and an
# initramfs to boot it directly. Cached: a no-op when it is current. Used by the slow guest-agent e2e tests
# (tests/e2e/test_guest_agent.py); scripts/setup.sh builds it into /var/cache/infinization/rootfs.
#
# Usage: scripts/build-rootfs.sh [OUTDIR]     (default /var/cache/infinization/rootfs; run as root)
#
# Produces OUTDIR/rootfs.qcow2 (use it as a disk's backing `image:`), OUTDIR/vmlinuz and OUTDIR/initrd.img
# (the Debian cloud kernel and an initramfs with virtio_pci, virtio_blk and ext4 forced in).
# OUTDIR/.stamp records the inputs (sha256 of this script and the suite); when it matches and the outputs
# exist the script exits at once. A cold build takes ~2-3 min (mostly downloads and dpkg).
#
# Boot with: -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.img, the image as the first virtio disk, and
#            -append 'root=/dev/vda rw console=ttyS0'
# On the first serial port the guest prints (besides the kernel's and systemd's own lines):
#   INFZ-ROOTFS-UP ips=<addr>/<prefix>[,...] agent=<active|inactive|...>
#                    once per boot, as soon as a NIC has its DHCP lease and qemu-guest-agent runs (when its
#                    virtio-serial port exists), or after 60 s without them
#   INFZ-JOURNAL <line>
#                    every journal line of qemu-ga and systemd-logind (e.g. "guest-shutdown called" or
#                    "Power key pressed"): how a test tells an agent shutdown from an ACPI power button.
# Every NIC named en*/eth* gets IPv4 by DHCP (systemd-networkd; no IPv6, so the addresses are deterministic).
set -euo pipefail

SUITE=bookworm
MIRROR=${INFZ_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=systemd,systemd-sysv,udev,dbus,qemu-guest-agent,linux-image-cloud-amd64,initramfs-tools,iproute2
# Forced into the initramfs (MODULES=list): what it needs to find and mount the root disk.
INITRAMFS_MODULES="virtio_pci virtio_blk ext4"

log() { echo "build-rootfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

OUTDIR=${1:-/var/cache/infinization/rootfs}
[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap chroots and mkfs.ext4 keeps root's file ownership)"
for tool in mmdebstrap mkfs.ext4 qemu-img; do
    command -v "$tool" >/dev/null || die "$tool is not installed (scripts/setup.sh installs it)"
done
SELF=$(readlink -f "${BASH_SOURCE[0]}")
INPUTS="script=$(sha256sum "$SELF" | cut -d' ' -f1) suite=$SUITE"

mkdir -p "$OUTDIR"
OUTDIR=$(readlink -f "$OUTDIR")
STAMP=$OUTDIR/.stamp
exec 9>"$OUTDIR/.lock"   # serialise concurrent builds into the same OUTDIR
flock 9
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS" ] \
        && [ -s "$OUTDIR/rootfs.qcow2" ] && [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initrd.img" ]; then
    log "up to date: $OUTDIR"
    exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/infz-rootfs.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
TREE=$WORK/tree
START=$(date +%s)

# The guest's own configuration, copied in by the customize hook below.
CONF=$WORK/conf
mkdir -p "$CONF/systemd/network" "$CONF/systemd/system" "$CONF/initramfs-tools/conf.d"
cat >"$CONF/systemd/network/50-infz-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF
mkdir -p "$CONF/sbin"
cat >"$CONF/sbin/infz-ready" <<'EOF'
#!/bin/sh
# Wait (bounded: 60 s) for a global IPv4 address and, when its virtio-serial port exists, for qemu-ga to run;
# then print the one line the tests wait for.
for i in $(seq 120); do
    if ip -4 -o addr show scope global | grep -q inet; then
        [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] || break
        systemctl -q is-active qemu-guest-agent && break
    fi
    sleep 0.5
done
ips=$(ip -4 -o addr show scope global | while read -r _ _ _ addr _; do printf '%s,' "$addr"; done)
echo "INFZ-ROOTFS-UP ips=${ips%,} agent=$(systemctl is-active qemu-guest-agent)" >/dev/ttyS0
EOF
cat >"$CONF/systemd/system/infz-ready.service" <<'EOF'
[Unit]
Description=Tell the host (serial console) that the guest is up, with its addresses
After=systemd-networkd.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/infz-ready

[Install]
WantedBy=multi-user.target
EOF
cat >"$CONF/systemd/system/infz-journal-console.service" <<'EOF'
[Unit]
Description=Copy qemu-ga's and systemd-logind's journal lines to the serial console
After=systemd-journald.service
DefaultDependencies=no
Before=sysinit.target

[Service]
ExecStart=/bin/sh -c 'journalctl -f -n all -o cat -t qemu-ga -t systemd-logind | sed -u "s/^/INFZ-JOURNAL /" >/dev/ttyS0'

[Install]
WantedBy=sysinit.target
EOF
echo "MODULES=list" >"$CONF/initramfs-tools/conf.d/infz.conf"   # only what it needs: a ~5 MiB initramfs

log "mmdebstrap $SUITE from $MIRROR into $TREE"
mmdebstrap --variant=minbase --mode=root --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --essential-hook="mkdir -p \"\$1/etc/initramfs-tools/conf.d\" && cp $CONF/initramfs-tools/conf.d/infz.conf \"\$1/etc/initramfs-tools/conf.d/\"" \
    --customize-hook="printf '%s\n' $INITRAMFS_MODULES >>\"\$1/etc/initramfs-tools/modules\" && chroot \"\$1\" update-initramfs -u -k all" \
    --customize-hook="cp $CONF/systemd/network/* \"\$1/etc/systemd/network/\"" \
    --customize-hook="cp $CONF/systemd/system/* \"\$1/etc/systemd/system/\"" \
    --customize-hook="install -m 0755 $CONF/sbin/infz-ready \"\$1/usr/local/sbin/\"" \
    --customize-hook='chroot "$1" systemctl enable systemd-networkd.service infz-ready.service infz-journal-console.service' \
    --customize-hook='chroot "$1" systemctl mask serial-getty@ttyS0.service getty@tty1.service apt-daily.timer apt-daily-upgrade.timer \
        systemd-networkd-wait-online.service e2scrub_reap.service e2scrub_all.timer fstrim.timer' \
    --customize-hook='echo infz-rootfs >"$1/etc/hostname"' \
    --customize-hook='printf "/dev/vda / ext4 defaults,errors=remount-ro 0 1\n" >"$1/etc/fstab"' \
    --customize-hook="cp \"\$1\"/boot/vmlinuz-* $WORK/vmlinuz && cp \"\$1\"/boot/initrd.img-* $WORK/initrd.img" \
    --customize-hook='rm -rf "$1/boot"/* "$1/vmlinuz" "$1/vmlinuz.old" "$1/initrd.img" "$1/initrd.img.old" "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/*.bin' \
    "$SUITE" "$TREE" "$MIRROR"

# An ext4 image from the tree: its size plus room for the guest to write (logs, test files).
used_mib=$(du -sm "$TREE" | cut -f1)
size_mib=$(( used_mib + used_mib / 5 + 128 ))
log "mkfs.ext4 -d ($used_mib MiB used, $size_mib MiB image)"
truncate -s "${size_mib}M" "$WORK/rootfs.raw"
mkfs.ext4 -q -L infz-root -d "$TREE" "$WORK/rootfs.raw"
qemu-img convert -f raw -O qcow2 "$WORK/rootfs.raw" "$WORK/rootfs.qcow2"

# World-readable: QEMU (the unprivileged infinization-qemu) opens the image as a linked clone's backing file.
install -m 0644 "$WORK/rootfs.qcow2" "$OUTDIR/rootfs.qcow2.partial"
install -m 0644 "$WORK/vmlinuz" "$OUTDIR/vmlinuz.partial"
install -m 0644 "$WORK/initrd.img" "$OUTDIR/initrd.img.partial"
for f in rootfs.qcow2 vmlinuz initrd.img; do mv "$OUTDIR/$f.partial" "$OUTDIR/$f"; done
chmod 0755 "$OUTDIR"
echo "$INPUTS" >"$STAMP"
log "built $OUTDIR in $(( $(date +%s) - START )) s: $(du -h "$OUTDIR/rootfs.qcow2" | cut -f1) qcow2," \
    "$(du -h "$OUTDIR/initrd.img" | cut -f1) initrd"
