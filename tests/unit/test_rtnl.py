"""``adapters.rtnl``: pyroute2's rtnetlink client without the rest of pyroute2 (issue 13: the sync daemon's
memory), on the real kernel; checked on ``sys.modules`` in a fresh interpreter, and the full package is
still there for whoever asks it for a name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
from reconciler.adapters import rtnl
with rtnl.iproute()() as ipr:
    names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    addresses = [addr.get_attr("IFA_ADDRESS") for addr in ipr.get_addr()]
assert issubclass(rtnl.netlink_error(), Exception)
lean = sorted(sys.modules)
from pyroute2 import NDB, IPRoute  # the whole package, on demand
print(json.dumps({"names": names, "addresses": addresses, "lean": lean, "same": IPRoute is rtnl.iproute(),
                  "ndb": NDB.__module__, "full": sorted(sys.modules)}))
"""


def test_only_rtnetlink_is_imported_and_the_whole_package_still_works() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert "lo" in found["names"] and "127.0.0.1" in found["addresses"]  # the real kernel answered
    heavy = ("pyroute2.ndb", "pyroute2.ipdb", "pyroute2.nftables", "pyroute2.netlink.nl80211", "pyroute2.ipvs",
             "pyroute2.plan9", "pyroute2.netlink.generic.wireguard")
    assert [name for name in found["lean"] if name.startswith(heavy)] == []
    assert found["same"] and found["ndb"].startswith("pyroute2.ndb")
    assert "pyroute2.ndb.main" in found["full"]
