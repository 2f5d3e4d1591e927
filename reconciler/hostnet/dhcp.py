"""The dnsmasq command line that serves DHCP on one Network's bridge (pure).

One dnsmasq per Network with ``dhcp``, DHCP only (``--port=0``: no DNS, so it never fights another
resolver for port 53), bound to the bridge, with its pidfile and leases file in the state directory. The
observer compares the running dnsmasq's /proc cmdline with this argv, so any change restarts it.
"""

from __future__ import annotations

import ipaddress

from reconciler.spec.models import Network

DNSMASQ = "dnsmasq"


def dnsmasq_argv(network: Network, pidfile: str, leases: str) -> list[str]:
    spec = network.spec
    assert spec.dhcp is not None and spec.address is not None
    host = str(ipaddress.ip_interface(spec.address).ip)
    mask = str(ipaddress.ip_interface(spec.address).netmask)
    return [
        DNSMASQ,
        "--conf-file=/dev/null",
        "--port=0",
        "--bind-interfaces",
        f"--interface={spec.bridge}",
        "--except-interface=lo",
        f"--listen-address={host}",
        f"--dhcp-range={spec.dhcp.rangeStart},{spec.dhcp.rangeEnd},{mask},{spec.dhcp.leaseTime}",
        f"--dhcp-option=option:router,{host}",
        "--dhcp-authoritative",
        f"--dhcp-leasefile={leases}",
        f"--pid-file={pidfile}",
    ]
