"""Inside the agent image: bring up the agent's TUN device and report what the kernel sees.

Prints one JSON line. Exit 0 when the device exists, is up, and carries the address and MTU
asked for; exit 1 with the error otherwise (e.g. without CAP_NET_ADMIN or /dev/net/tun).
"""

import ipaddress
import json
import sys

from cyphonic_agent.tun import TunConfig, TunDevice
from pyroute2 import IPRoute

ADDRESS = ipaddress.IPv4Interface("100.64.7.1/16")
MTU = 1380

try:
    device = TunDevice.open(TunConfig(name="cyphonic0", mtu=MTU, ipv4=ADDRESS))
except Exception as exc:  # the error type is part of the report
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
    sys.exit(1)
with device, IPRoute() as ipr:
    link = ipr.get_links(device.index)[0]
    addresses = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=device.index, family=2)]
    report = {
        "name": link.get_attr("IFLA_IFNAME"),
        "up": bool(link["flags"] & 1),
        "mtu": link.get_attr("IFLA_MTU"),
        "ipv4": addresses,
    }
report["ok"] = report["up"] and report["mtu"] == MTU and str(ADDRESS.ip) in report["ipv4"]
print(json.dumps(report))
sys.exit(0 if report["ok"] else 1)
