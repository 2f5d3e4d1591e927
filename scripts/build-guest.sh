#!/bin/bash
# Build Infinization's small test guest (kernel + busybox initramfs) from
# Debian packages, cached.
#
# Usage: scripts/build-guest.sh OUTDIR
#
# Produces OUTDIR/vmlinuz and OUTDIR/initrd.img.  OUTDIR/.stamp records the
# inputs (kernel package + version, busybox-static version, sha256 of this
# script); when it matches and both outputs exist the script exits at once.
#
# Downloaded .debs are kept in ${INFZ_CACHE:-/var/cache/infinization}/debs.
# Nothing is installed on the host.
#
# Boot with: -kernel OUTDIR/vmlinuz -initrd OUTDIR/initrd.img
#            -append 'console=ttyS0 panic=-1 [infz.* parameters, below]'
# The guest prints on the first serial port:
#   INFZ-BOOTED                      once, when ready
#   INFZ-REPORT seq=<n> disks=<name>:<bytes>[,...] nics=<if>@<mac>:<up|down>[,...] mem_kb=<kB> cpus=<n>
#               cds=<srN>:<ISO volume label or ->[,...] [ping=<target>:<ok|fail>[,...]] ips=<if>:<cidr>[,...]
#               efi=<0|1> sb=<0|1|-> tpm=<0|1> rng=<hw_random driver or -> cidata=<instance-id>:<sha256>|-
#               ips=<if>:<addr>/<prefix>[,...] ro=<read-only disk>[,...] uuid=<SMBIOS product_uuid or ->
#               ports=<virtio-serial port name>[,...]
#               pci=<class>:<vendor>:<device>[,...] (display, audio and USB controllers only)
#               boot=<infz.boot's value or ->
#               ekcert=<1: the TPM's RSA EK certificate NV index 0x01c00002 exists, 0: not, -: no TPM>
#                                    (one line) whenever anything but seq changes; ping= only
#                                    with infz.ping, ips= always (IPv4 on non-lo interfaces,
#                                    empty when none).  A change is reported within a tick
#                                    (~0.3 s) when it comes with a kernel uevent (a device added
#                                    or removed, a disk resized, a CD changed, a CPU onlined) or
#                                    shows in a NIC's carrier or MemTotal; anything else within
#                                    30 s (the loop's safety scan)
#   INFZ-TICK up=<s> boot=<id>       infz.tick: every tick (~0.3 s of guest time), the guest's uptime
#                                    (/proc/uptime) and its boot (the first part of its boot_id): a guest
#                                    that is paused prints none and its clock does not advance meanwhile
#   INFZ-POWEROFF                    when the ACPI power button was pressed
#   INFZ-INSTALLED <disk> <bytes>    infz.install: the image was written to the disk (then power off)
#   INFZ-INSTALL-FAILED <why>        infz.install: no CD with the image, no disk, or dd failed
# On each named virtio-serial port except the guest agent's, it writes "INFZ-PORT <name>" every second
# (a write blocks until the host side connects, so a host that connects reads it).
# It onlines hot-plugged CPUs and memory blocks, brings NICs up, and powers
# off (QEMU exits) on QMP system_powerdown.
#
# Optional kernel command line parameters (read once from /proc/cmdline):
#   infz.ip=<if>:<addr>/<prefix>[+<if>:<addr>/<prefix>...]
#                  add these IPv4 addresses once the interface exists and is up
#                  (retried every loop, so hot-plugged NICs get theirs too)
#   infz.gw=<addr> default route via <addr>, added as soon as it is reachable
#   infz.mac=<if>:<mac>[+<if>:<mac>...]
#                  set the interface's MAC before bringing it up the first time
#                  (simulates a guest spoofing its MAC)
#   infz.ping=<addr>[+<addr>...]
#                  ping each IPv4 target once per loop (busybox ping -c 1 -W 1,
#                  all targets in parallel, so ~1 s at most) and report ping=
#   infz.boot=<word>
#                  reported as boot=<word>: a boot loader's marker of where the kernel
#                  came from (the install proof's CD says cd, its disk says disk)
#   infz.tick      print an INFZ-TICK line every loop (the paused-VM proof)
#   infz.install=<file>
#                  an "installer": after the first report, copy <file> from the first
#                  ISO 9660 CD-ROM that has it onto the first virtio disk (dd, fsync),
#                  print INFZ-INSTALLED and power off (once per boot)
#   infz.dhcp=<if>[+<if>...]
#                  once the interface exists and is up, run busybox udhcpc on it
#                  in the background (-f -t 5 -T 1 -A 2: 5 discovers 1 s apart,
#                  then 2 s pause, retried forever until a server answers; the
#                  report loop never waits for it).  /etc/udhcpc.script adds the
#                  lease as <ip>/<prefix> (replacing the previous lease address),
#                  replaces the default route via the offered router, and on
#                  deconfig flushes all IPv4 addresses of the interface (so do
#                  not combine infz.ip and infz.dhcp on one interface).  The
#                  lease shows up in ips=.  udhcpc is restarted if it dies or the
#                  interface is re-created (new ifindex); its output goes to
#                  /var/log/udhcpc.<if>.log, not the console.
set -euo pipefail

META_PKG=linux-image-cloud-amd64
BUSYBOX_PKG=busybox-static
# Load order matters (dependencies first); missing ones are skipped in the guest.
MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
virtio_blk failover net_failover virtio_net virtio_balloon evdev button
scsi_common scsi_mod virtio_scsi sd_mod cdrom sr_mod isofs virtio-rng efivarfs virtio_console"

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ $# -eq 1 ] && [ -n "$1" ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
OUTDIR=$1
SELF=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_SHA=$(sha256sum "$SELF" | cut -d' ' -f1)
CACHE=${INFZ_CACHE:-/var/cache/infinization}
DEBS=$CACHE/debs

mkdir -p "$OUTDIR"
OUTDIR=$(readlink -f "$OUTDIR")
STAMP=$OUTDIR/.stamp

# Serialise concurrent builds into the same OUTDIR.
exec 9>"$OUTDIR/.lock"
flock 9

# --- resolve inputs --------------------------------------------------------
KPKG= KVER= BBVER=
resolve() {
    # One apt-cache call (each one rebuilds apt's cache when pkgcache is
    # disabled, ~0.5 s).  The meta-package depends on "KPKG (= VERSION)".
    local out
    out=$(apt-cache show --no-all-versions "$META_PKG" "$BUSYBOX_PKG" 2>/dev/null) || true
    read -r KPKG KVER < <(awk -v m="$META_PKG" '
        /^Package:/ { p = $2 }
        p == m && /^Depends:/ {
            n = split(substr($0, 10), deps, ",")
            for (i = 1; i <= n; i++) {
                if (match(deps[i], /linux-image-[0-9][^ (|]*/)) {
                    pkg = substr(deps[i], RSTART, RLENGTH); ver = ""
                    if (match(deps[i], /\(= [^)]*\)/)) ver = substr(deps[i], RSTART + 3, RLENGTH - 4)
                    print pkg, ver; exit
                }
            }
        }' <<<"$out") || true
    BBVER=$(awk -v m="$BUSYBOX_PKG" '/^Package:/ { p = $2 } p == m && /^Version:/ { print $2; exit }' <<<"$out") || true
    [ -n "${KPKG:-}" ] && [ -n "$BBVER" ] || return 1
    if [ -z "${KVER:-}" ]; then   # no exact "(= VERSION)": ask for the candidate
        KVER=$(apt-cache policy "$KPKG" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }') || true
    fi
    [ -n "$KVER" ] && [ "$KVER" != "(none)" ]
}
stamp_text() {
    printf 'kernel=%s %s\nbusybox=%s\nscript=%s\n' "$KPKG" "$KVER" "$BBVER" "$SCRIPT_SHA"
}
outputs_exist() { [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initrd.img" ] && [ -f "$STAMP" ]; }

if ! resolve; then
    log "cannot resolve $META_PKG from the apt lists; running apt-get update once"
    if ! apt-get update -qq >&2 || ! resolve; then
        # Offline and no lists: an existing build from this very script is
        # still better than failing.
        if outputs_exist && grep -qx "script=$SCRIPT_SHA" "$STAMP"; then
            echo "guest in $OUTDIR is cached (apt unavailable; kernel version not re-checked)"
            exit 0
        fi
        die "cannot resolve the kernel package behind $META_PKG"
    fi
fi
KREL=${KPKG#linux-image-}

if outputs_exist && [ "$(cat "$STAMP")" = "$(stamp_text)" ]; then
    echo "guest in $OUTDIR is cached ($KPKG $KVER)"
    exit 0
fi

log "building guest: $KPKG $KVER, $BUSYBOX_PKG $BBVER -> $OUTDIR"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/infz-guest.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# --- fetch .debs (cached) --------------------------------------------------
mkdir -p "$DEBS"
# Let apt's sandbox user write here (avoids the "unsandboxed" warning).
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then chown _apt "$DEBS" 2>/dev/null || true; fi

# fetch PKG VERSION -> prints the path of a verified .deb in $DEBS
fetch() {
    local pkg=$1 ver=$2 sha f
    sha=$(apt-cache show "$pkg=$ver" 2>/dev/null | awk '$1 == "SHA256:" { print $2; exit }') || true
    for f in "$DEBS/${pkg}_"*.deb; do
        [ -f "$f" ] || continue
        [ "$(dpkg-deb -f "$f" Package 2>/dev/null)" = "$pkg" ] || continue
        [ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$ver" ] || continue
        if [ -z "$sha" ] || [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$sha" ]; then
            echo "$f"; return 0
        fi
        rm -f "$f"
    done
    log "downloading $pkg=$ver"
    (cd "$DEBS" && flock "$DEBS/.lock" apt-get download -q "$pkg=$ver" >&2) ||
        die "apt-get download $pkg=$ver failed"
    for f in "$DEBS/${pkg}_"*.deb; do
        [ -f "$f" ] && [ "$(dpkg-deb -f "$f" Version 2>/dev/null)" = "$ver" ] && { echo "$f"; return 0; }
    done
    die "downloaded $pkg=$ver but cannot find the .deb in $DEBS"
}
KDEB=$(fetch "$KPKG" "$KVER")
BBDEB=$(fetch "$BUSYBOX_PKG" "$BBVER")

dpkg -x "$KDEB" "$TMP/kernel"
dpkg -x "$BBDEB" "$TMP/busybox"

VMLINUZ=$TMP/kernel/boot/vmlinuz-$KREL
[ -f "$VMLINUZ" ] || die "no /boot/vmlinuz-$KREL in $KDEB"
MODDIR=$TMP/kernel/lib/modules/$KREL
[ -d "$MODDIR" ] || die "no /lib/modules/$KREL in $KDEB"
BUSYBOX=$TMP/busybox/bin/busybox
[ -x "$BUSYBOX" ] || die "no /bin/busybox in $BBDEB"

# --- initramfs tree --------------------------------------------------------
R=$TMP/root
mkdir -p "$R"/{bin,dev,proc,sys,run,tmp,var/log,etc/acpi/PWRF,lib/modules/infz}
ln -s bin "$R/sbin"
mkdir -p "$R/usr"
ln -s ../bin "$R/usr/bin"
ln -s ../bin "$R/usr/sbin"
ln -s ../run "$R/var/run"
chmod 1777 "$R/tmp"

install -m 0755 "$BUSYBOX" "$R/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    case $applet in busybox) continue ;; esac
    ln -sf busybox "$R/bin/$applet"
done
[ -L "$R/bin/sh" ] || die "busybox has no sh applet"

# Console/null nodes so the kernel can hand /init an open console (only
# possible as root; /init copes without them).
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$R/dev/null" c 1 3 2>/dev/null || true

# Kernel modules, decompressed so busybox insmod can load them.
for m in $MODULES; do
    f=$(find "$MODDIR" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) -print -quit)
    if [ -z "$f" ]; then
        log "warning: module $m not found in $KPKG (built in or absent); skipping"
        continue
    fi
    case $f in
        *.ko.xz)  xz -dc "$f" >"$R/lib/modules/infz/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$R/lib/modules/infz/$m.ko" ;;
        *.ko.gz)  gzip -dc "$f" >"$R/lib/modules/infz/$m.ko" ;;
        *)        cp "$f" "$R/lib/modules/infz/$m.ko" ;;
    esac
done
echo $MODULES >"$R/lib/modules/infz/order"

# busybox acpid maps KEY_POWER from /dev/input/event* to "PWRF/00000080" and
# executes /etc/acpi/PWRF/00000080 (it chdirs to /etc/acpi).
cat >"$R/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
echo INFZ-POWEROFF >/dev/console 2>/dev/null
sync
poweroff -f
EOF
chmod 0755 "$R/etc/acpi/PWRF/00000080"

# infz.dhcp: udhcpc event script.  udhcpc exports $interface, $ip, $subnet
# (dotted netmask), $router (space-separated list) and more; $1 is the event.
cat >"$R/etc/udhcpc.script" <<'EOF'
#!/bin/sh
PATH=/bin; export PATH
state=/run/udhcpc.$interface.addr
case $1 in
    deconfig)
        ip -4 addr flush dev "$interface" 2>/dev/null
        rm -f "$state"
        ;;
    bound|renew)
        # Netmask -> prefix length (counts the leading one bits).
        pfx=
        if [ -n "$subnet" ]; then
            oifs=$IFS; IFS=.; set -- $subnet; IFS=$oifs
            if [ $# -eq 4 ]; then
                pfx=0
                for o in "$@"; do
                    case $o in ''|*[!0-9]*) pfx=; break ;; esac
                    while [ $(( o & 128 )) -ne 0 ]; do
                        pfx=$(( pfx + 1 )); o=$(( (o << 1) & 255 ))
                    done
                done
            fi
        fi
        [ -n "$pfx" ] || pfx=${mask:-32}
        new=$ip/$pfx
        old=; { read old <"$state"; } 2>/dev/null
        if [ -n "$old" ] && [ "$old" != "$new" ]; then
            ip addr del "$old" dev "$interface" 2>/dev/null
        fi
        # On renew the address usually exists already (EEXIST): fine.
        if [ -n "$broadcast" ]; then
            ip addr add "$new" broadcast "$broadcast" dev "$interface" 2>/dev/null ||
                ip addr add "$new" dev "$interface" 2>/dev/null
        else
            ip addr add "$new" dev "$interface" 2>/dev/null
        fi
        echo "$new" >"$state"
        if [ -n "$router" ]; then
            set -- $router
            ip route replace default via "$1" dev "$interface" 2>/dev/null
        fi
        ;;
esac
# A lease is no uevent: wake the report loop so ips= shows it at once.
[ -p /run/infz-wake ] && echo "dhcp $1" 1<>/run/infz-wake
exit 0
EOF
chmod 0755 "$R/etc/udhcpc.script"

# busybox uevent runs this for every kernel uevent: wake the report loop (see infz-main).  Opened
# read-write so it never blocks, even while infz-main restarts and nobody reads the FIFO.
cat >"$R/bin/infz-wake" <<'EOF'
#!/bin/sh
[ -p /run/infz-wake ] && echo "${ACTION:-?} ${SUBSYSTEM:-?}" 1<>/run/infz-wake
exit 0
EOF
chmod 0755 "$R/bin/infz-wake"

# /init: PID 1 must never exit, so it only mounts and then keeps (re)starting
# the real work in /bin/infz-main.
cat >"$R/init" <<'EOF'
#!/bin/sh
PATH=/bin; export PATH
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
while :; do
    { /bin/sh /bin/infz-main; } </dev/console >/dev/console 2>&1
    { echo "infz: main loop exited ($?), restarting"; } >/dev/console 2>&1
    sleep 1
done
EOF
chmod 0755 "$R/init"

cat >"$R/bin/infz-main" <<'EOF'
#!/bin/sh
# Setup once, then report forever.  Restartable: state lives in /run.
PATH=/bin; export PATH

pidfile_alive() {    # PIDFILE -> true while the process it names runs
    pid=; { read pid <"$1"; } 2>/dev/null
    [ -n "$pid" ] && [ -d "/proc/$pid" ]
}

start_acpid() {
    [ -e /dev/input/event0 ] || return 0
    pidfile_alive /run/acpid.pid && return 0
    acpid -c /etc/acpi -l /var/log/acpid.log -p /run/acpid.pid
}

# infz.* kernel parameters ("+"-separated lists; see build-guest.sh).
CFG_IP= CFG_GW= CFG_MAC= CFG_PING= CFG_DHCP= CFG_BOOT= CFG_INSTALL= CFG_TICK=
for w in $(cat /proc/cmdline 2>/dev/null); do
    case $w in
        infz.ip=*)   CFG_IP=$(echo "${w#*=}" | tr + ' ') ;;
        infz.gw=*)   CFG_GW=${w#*=} ;;
        infz.mac=*)  CFG_MAC=$(echo "${w#*=}" | tr + ' ') ;;
        infz.ping=*) CFG_PING=$(echo "${w#*=}" | tr + ' ') ;;
        infz.dhcp=*) CFG_DHCP=$(echo "${w#*=}" | tr + ' ') ;;
        infz.boot=*) CFG_BOOT=${w#*=} ;;
        infz.install=*) CFG_INSTALL=${w#*=} ;;
        infz.tick) CFG_TICK=1 ;;
    esac
done
PENDING_IP=$CFG_IP PENDING_GW=$CFG_GW

nic_up() {    # bring NICs (ethX, enpX, ...) administratively up
    for d in /sys/class/net/*; do
        n=${d##*/}
        case $n in eth*|en*) ;; *) continue ;; esac
        fl=; { read fl <"$d/flags"; } 2>/dev/null
        case $fl in 0x*) ;; *) fl=0x0 ;; esac
        [ $(( fl & 1 )) -eq 1 ] && continue
        for e in $CFG_MAC; do    # infz.mac: spoof before the first "up"
            [ "${e%%:*}" = "$n" ] || continue
            mac=; { read mac <"$d/address"; } 2>/dev/null
            [ "$mac" = "${e#*:}" ] || ip link set "$n" address "${e#*:}" \
                || echo "infz: cannot set $n address ${e#*:}"
        done
        ip link set "$n" up 2>/dev/null
    done
}

net_config() {    # apply pending infz.ip / infz.gw; retried until done
    left=
    for e in $PENDING_IP; do
        n=${e%%:*} a=${e#*:}
        fl=; { read fl <"/sys/class/net/$n/flags"; } 2>/dev/null
        case $fl in 0x*) ;; *) left="$left $e"; continue ;; esac
        if [ $(( fl & 1 )) -ne 1 ]; then left="$left $e"; continue; fi
        case " $(ip -4 -o addr show dev "$n" 2>/dev/null | awk '{ print $4 }' | tr '\n' ' ') " in
            *" $a "*) continue ;;    # already there (e.g. infz-main restarted)
        esac
        ip addr add "$a" dev "$n" 2>/dev/null || left="$left $e"
    done
    PENDING_IP=$left
    if [ -n "$PENDING_GW" ]; then
        if ip route show 2>/dev/null | grep -q "^default via $PENDING_GW "; then
            PENDING_GW=
        elif ip route add default via "$PENDING_GW" 2>/dev/null; then
            PENDING_GW=
        fi
    fi
}

dhcp_run() {    # infz.dhcp: keep one background udhcpc per listed, up interface
    for n in $CFG_DHCP; do
        fl=; { read fl <"/sys/class/net/$n/flags"; } 2>/dev/null
        case $fl in 0x*) ;; *) continue ;; esac
        [ $(( fl & 1 )) -eq 1 ] || continue
        idx=; { read idx <"/sys/class/net/$n/ifindex"; } 2>/dev/null
        pid= was=; { read pid was <"/run/infz-dhcp.$n"; } 2>/dev/null
        if [ -n "$pid" ] && [ -d "/proc/$pid" ]; then
            c=; { read c <"/proc/$pid/comm"; } 2>/dev/null
            if [ "$c" = udhcpc ]; then
                [ "$was" = "$idx" ] && continue
                kill "$pid" 2>/dev/null    # interface re-created: start afresh
            fi
        fi
        udhcpc -f -i "$n" -t 5 -T 1 -A 2 -s /etc/udhcpc.script \
            </dev/null >>"/var/log/udhcpc.$n.log" 2>&1 &
        echo "$! $idx" >"/run/infz-dhcp.$n"
    done
}

ping_all() {    # -> "ping=T:ok|fail,..." (empty without infz.ping); targets in parallel
    [ -n "$CFG_PING" ] || return 0
    rm -f /run/infz-ping.*
    i=0
    for t in $CFG_PING; do
        i=$(( i + 1 ))
        ( if ping -c 1 -W 1 "$t" >/dev/null 2>&1; then r=ok; else r=fail; fi
          echo "$r" >"/run/infz-ping.$i" ) &
    done
    wait
    out= i=0
    for t in $CFG_PING; do
        i=$(( i + 1 ))
        r=fail; { read r <"/run/infz-ping.$i"; } 2>/dev/null
        out="${out:+$out,}$t:$r"
    done
    echo " ping=$out"
}

# A cloud-init NoCloud seed: the CD whose ISO 9660 label is "cidata" -> "<instance-id>:<sha256 of user-data>"
# ("-" when there is none). Mounted read-only only while it is read.
read_cidata() {
    for d in /sys/block/sr*; do
        [ -e "$d" ] || continue
        n=${d##*/}
        label=$(dd if=/dev/$n bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=40 count=32 2>/dev/null \
                | tr -d '\000' | sed 's/ *$//')
        [ "$label" = cidata ] || continue
        mkdir -p /run/cidata
        mount -t iso9660 -o ro /dev/$n /run/cidata 2>/dev/null || continue
        id=$(sed -n 's/^instance-id: *//p' /run/cidata/meta-data 2>/dev/null | tr -d '"' | tr ' ' _)
        sum=$(sha256sum /run/cidata/user-data 2>/dev/null | cut -d' ' -f1)
        umount /run/cidata 2>/dev/null
        echo "${id:--}:${sum:--}"
        return
    done
    echo -
}

# infz.install: the test's "installer". Copies the image from the install CD onto the first virtio disk,
# then powers off as an OS installer does at its end (once per boot; a failure is printed, not retried).
install_disk() {
    [ -n "$CFG_INSTALL" ] && [ ! -e /run/infz-installed ] || return 0
    : >/run/infz-installed
    target=
    for d in /sys/block/vd*; do
        [ -e "$d" ] && { target=/dev/${d##*/}; break; }
    done
    [ -n "$target" ] || { echo "INFZ-INSTALL-FAILED no-disk"; return 0; }
    mkdir -p /run/install
    for d in /sys/block/sr*; do
        [ -e "$d" ] || continue
        mount -t iso9660 -o ro "/dev/${d##*/}" /run/install 2>/dev/null || continue
        if [ -f "/run/install/$CFG_INSTALL" ]; then
            size=$(wc -c <"/run/install/$CFG_INSTALL")
            if dd if="/run/install/$CFG_INSTALL" of="$target" bs=1M conv=fsync 2>/dev/null; then
                umount /run/install 2>/dev/null
                sync
                echo "INFZ-INSTALLED $target $size"
                poweroff -f
            fi
            umount /run/install 2>/dev/null
            echo "INFZ-INSTALL-FAILED dd"
            return 0
        fi
        umount /run/install 2>/dev/null
    done
    echo "INFZ-INSTALL-FAILED no-image"
}

# The TPM's RSA EK certificate (NV index 0x01c00002, as swtpm_setup --create-ek-cert writes it): one raw
# TPM2_NV_ReadPublic on /dev/tpm0 (no tpm2-tools here); response code 0 means the index exists. Asked once
# per boot (/dev/tpm0 allows one opener) -> 1, 0, or - without a TPM.
read_ekcert() {
    if [ -r /run/infz-ekcert ]; then cat /run/infz-ekcert; return; fi
    [ -c /dev/tpm0 ] || { echo -; return; }
    rc=$( { exec 3<>/dev/tpm0 || exit 1
            printf '\200\001\000\000\000\016\000\000\001\151\001\300\000\002' >&3
            dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1 -v | tr -d ' \n' | cut -c13-20; } 2>/dev/null)
    case $rc in 00000000) v=1 ;; ????????) v=0 ;; *) echo -; return ;; esac
    echo "$v" >/run/infz-ekcert
    echo "$v"
}

if [ ! -e /run/infz-setup-done ]; then
    : >/run/infz-setup-done
    for m in $(cat /lib/modules/infz/order); do
        if [ -e "/lib/modules/infz/$m.ko" ]; then
            insmod "/lib/modules/infz/$m.ko" || echo "infz: insmod $m failed"
        else
            echo "infz: module $m not in initramfs, skipped"
        fi
    done
    ip link set lo up 2>/dev/null
    nic_up
    # Hot-added memory: online it right away; movable so it can be unplugged.
    { echo online_movable >/sys/devices/system/memory/auto_online_blocks; } 2>/dev/null
    start_acpid || echo "infz: acpid failed to start"
    # Keep kernel info/debug chatter (e.g. on hotplug) off the console so it
    # cannot split report lines; warnings and worse still show.
    { echo 5 >/proc/sys/kernel/printk; } 2>/dev/null
    if [ -d /sys/firmware/efi ]; then
        mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null || echo "infz: efivarfs not mounted"
    fi
    echo INFZ-BOOTED
fi

# The report loop wakes on kernel uevents instead of rescanning everything every 0.3 s: a full scan forks
# dd, sed, awk and ip, and under TCG that cost an idle guest 14-40 % of a host core (25 idle guests
# saturated 2 cores).  Each 0.3 s tick now reads only what changes without a uevent (NIC carrier after
# set_link, MemTotal after a balloon change), with shell builtins: a disk, NIC, CPU or memory block that
# comes or goes, a disk resize (RESIZE=1) and a CPU going online all send uevents.
# A full scan runs when a uevent arrived (busybox uevent -> /bin/infz-wake -> the FIFO /run/infz-wake),
# when that cheap view changed, for 3 s after any reported change (follow-on changes such as an address
# arriving), every tick while infz.ping is set or infz.ip/infz.gw are pending, and at least every 30 s.
# CD-ROM media changes become uevents because the block layer polls the drives (events_dfl_poll_msecs).
start_uevent() {
    pidfile_alive /run/uevent.pid && return 0
    uevent /bin/infz-wake </dev/null >/dev/null 2>&1 &
    echo $! >/run/uevent.pid
}

scan_devices() {    # -> $disks $nics $mem $cpus (and $NIC_DIRS for scan_tick), builtins only
    disks=
    for d in /sys/block/*; do
        n=${d##*/}
        case $n in vd*|sd*|sr*) ;; *) continue ;; esac
        s=; { read s <"$d/size"; } 2>/dev/null
        case $s in ''|*[!0-9]*) s=0 ;; esac
        disks="${disks:+$disks,}$n:$(( s * 512 ))"
    done
    nics= NIC_DIRS=
    for d in /sys/class/net/*; do
        n=${d##*/}
        [ "$n" = lo ] && continue
        [ -e "$d" ] || continue
        NIC_DIRS="$NIC_DIRS $d"
        mac=; { read mac <"$d/address"; } 2>/dev/null
        c=; { read c <"$d/carrier"; } 2>/dev/null
        st=down; [ "$c" = 1 ] && st=up
        nics="${nics:+$nics,}$n@$mac:$st"
    done
    mem=; { read k mem u </proc/meminfo; } 2>/dev/null
    cpus=0; online=
    { read online </sys/devices/system/cpu/online; } 2>/dev/null
    oifs=$IFS; IFS=,
    for r in $online; do
        a=${r%-*}; b=${r#*-}
        case $a$b in ''|*[!0-9]*) continue ;; esac
        cpus=$(( cpus + b - a + 1 ))
    done
    IFS=$oifs
}

scan_tick() {    # -> $cheap: what changes without a uevent (NIC carrier, MemTotal), builtins only
    cheap=
    for d in $NIC_DIRS; do
        c=; { read c <"$d/carrier"; } 2>/dev/null
        cheap="$cheap$c"
    done
    m=; { read k m u </proc/meminfo; } 2>/dev/null
    cheap="$cheap $m"
}

scan_full() {    # act on what appeared (CPUs, memory, NICs, daemons), then -> $cur
    for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
        v=; { read v <"$f"; } 2>/dev/null
        [ "$v" = 0 ] && { echo 1 >"$f"; } 2>/dev/null
    done
    for f in /sys/devices/system/memory/memory[0-9]*/state; do
        v=; { read v <"$f"; } 2>/dev/null
        if [ "$v" = offline ]; then
            { echo online_movable >"$f"; } 2>/dev/null || { echo online >"$f"; } 2>/dev/null
        fi
    done
    nic_up
    net_config
    dhcp_run
    start_acpid 2>/dev/null
    start_uevent
    scan_devices

    # CD-ROMs: the ISO 9660 volume label of the medium ("-" when empty).
    cds=
    for d in /sys/block/sr*; do
        [ -e "$d" ] || continue
        n=${d##*/}
        label=$(dd if=/dev/$n bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=40 count=32 2>/dev/null \
                | tr -d '\000' | sed 's/ *$//; s/ /_/g')
        cds="${cds:+$cds,}$n:${label:--}"
    done

    pings=$(ping_all)

    # Firmware: UEFI or not, Secure Boot's state (the 5th byte of the SecureBoot EFI variable), a TPM, the
    # hardware RNG in use, and a cloud-init NoCloud seed (a CD labelled cidata: its instance-id and the
    # sha256 of its user-data).
    efi=0; sb=-
    if [ -d /sys/firmware/efi ]; then
        efi=1
        for v in /sys/firmware/efi/efivars/SecureBoot-*; do
            [ -e "$v" ] || continue
            sb=$(dd if="$v" bs=1 skip=4 count=1 2>/dev/null | od -An -tu1 | tr -d ' ')
        done
    fi
    tpm=0; [ -e /sys/class/tpm/tpm0 ] && tpm=1
    rng=; { read rng </sys/class/misc/hw_random/rng_current; } 2>/dev/null
    case $rng in ''|none) rng=- ;; esac
    cidata=$(read_cidata)
    # Read-only disks (/sys/block/X/ro) and the SMBIOS system UUID QEMU gave (-uuid).
    ro=
    for d in /sys/block/vd* /sys/block/sd*; do
        [ -e "$d/ro" ] || continue
        v=; { read v <"$d/ro"; } 2>/dev/null
        [ "$v" = 1 ] && ro="${ro:+$ro,}${d##*/}"
    done
    uuid=; { read uuid </sys/class/dmi/id/product_uuid; } 2>/dev/null
    # Named virtio-serial ports; each but the agent's gets one background writer of "INFZ-PORT <name>".
    ports=
    for d in /sys/class/virtio-ports/*; do
        [ -e "$d/name" ] || continue
        pn=; { read pn <"$d/name"; } 2>/dev/null
        [ -n "$pn" ] || continue
        ports="${ports:+$ports,}$pn"
        [ "$pn" = org.qemu.guest_agent.0 ] && continue
        [ -e "/run/infz-port.${d##*/}" ] && continue
        : >"/run/infz-port.${d##*/}"
        ( while :; do echo "INFZ-PORT $pn" >"/dev/${d##*/}" 2>/dev/null; sleep 1; done ) &
    done

    # Display, sound and USB controllers the guest sees on PCI (sysfs needs no driver): class:vendor:device.
    pci=
    for d in /sys/bus/pci/devices/*; do
        [ -e "$d/class" ] || continue
        c=; v=; dv=
        { read c <"$d/class"; read v <"$d/vendor"; read dv <"$d/device"; } 2>/dev/null
        c=${c#0x}; c=${c%??}
        case $c in 0300|0380|0403|0c03) pci="${pci:+$pci,}$c:${v#0x}:${dv#0x}" ;; esac
    done

    # IPv4 addresses actually configured on non-lo interfaces.
    ips=$(ip -4 -o addr show 2>/dev/null | awk '$3 == "inet" && $2 != "lo" { printf "%s%s:%s", s, $2, $4; s = "," }')

    cur="disks=$disks nics=$nics mem_kb=$mem cpus=$cpus cds=$cds$pings ips=$ips efi=$efi sb=${sb:--} tpm=$tpm"
    ekcert=-; [ "$tpm" = 1 ] && ekcert=$(read_ekcert)
    cur="$cur rng=$rng cidata=$cidata ro=$ro uuid=${uuid:--} ports=$ports pci=$pci boot=${CFG_BOOT:--} ekcert=$ekcert"
}

seq=0; prev=
{ read seq </run/infz-seq; } 2>/dev/null
case $seq in ''|*[!0-9]*) seq=0 ;; esac
{ read -r prev </run/infz-prev; } 2>/dev/null

[ -p /run/infz-wake ] || mkfifo -m 600 /run/infz-wake
exec 3<>/run/infz-wake    # read-write: never blocks, never sees end-of-file
{ echo 300 >/sys/module/block/parameters/events_dfl_poll_msecs; } 2>/dev/null

woke=1 fast_until=0 next_full=0 seen= NIC_DIRS=
while :; do
    up=0; { read up _ </proc/uptime; } 2>/dev/null
    now=${up%.*}
    scan_tick
    if [ -n "$woke" ] || [ "$cheap" != "$seen" ] || [ "$now" -lt "$fast_until" ] || [ "$now" -ge "$next_full" ] \
        || [ -n "$CFG_PING$PENDING_IP$PENDING_GW" ]; then
        scan_full
        scan_tick    # the carriers and MemTotal the full scan reported (it may have onlined memory)
        next_full=$(( now + 30 ))
        if [ "$cur" != "$prev" ]; then
            seq=$(( seq + 1 ))
            echo "INFZ-REPORT seq=$seq $cur"
            prev=$cur
            fast_until=$(( now + 3 ))
            { echo "$seq" >/run/infz-seq; echo "$cur" >/run/infz-prev; } 2>/dev/null
        fi
        install_disk
    fi
    seen=$cheap
    if [ -n "$CFG_TICK" ]; then
        bid=; { read bid </proc/sys/kernel/random/boot_id; } 2>/dev/null
        echo "INFZ-TICK up=$up boot=${bid%%-*}"
    fi
    woke=
    if read -t 0.3 -u 3 w 2>/dev/null; then
        woke=1
        while read -t 0 -u 3 && read -u 3 w; do :; done    # one scan for a burst of uevents
    fi
done
EOF
chmod 0755 "$R/bin/infz-main"

# --- pack ------------------------------------------------------------------
# Fixed mtimes so the same inputs give a byte-identical initrd.
find "$R" -exec touch -h -d @0 {} +
(cd "$R" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --quiet --null -o -H newc -R 0:0 --reproducible) | gzip -9 -n >"$TMP/initrd.img"

# Replace outputs atomically; the stamp goes last.
rm -f "$STAMP"
cp "$VMLINUZ" "$OUTDIR/.vmlinuz.new"
cp "$TMP/initrd.img" "$OUTDIR/.initrd.img.new"
mv -f "$OUTDIR/.vmlinuz.new" "$OUTDIR/vmlinuz"
mv -f "$OUTDIR/.initrd.img.new" "$OUTDIR/initrd.img"
stamp_text >"$STAMP.new"
mv -f "$STAMP.new" "$STAMP"
echo "guest built in $OUTDIR ($KPKG $KVER, initrd $(stat -c %s "$OUTDIR/initrd.img") bytes)"
