"""Pure rendering of host networking: nftables rulesets for per-NIC firewalls and NAT. No I/O."""
