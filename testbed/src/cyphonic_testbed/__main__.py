"""``python -m cyphonic_testbed {cleanup,list,show}``: maintenance of namespace test beds."""

from __future__ import annotations

import argparse
import sys

from cyphonic_testbed.bed import RUN_ID_RE, cleanup_stale, list_namespaces
from cyphonic_testbed.patterns import PATTERNS
from cyphonic_testbed.topology import plan


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m cyphonic_testbed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cleanup", help="remove namespaces and files of test-bed runs that died")
    sub.add_parser("list", help="list the namespaces of test beds (live or stale)")
    show = sub.add_parser("show", help="print the addresses and routes of a ready-made bed")
    show.add_argument("pattern", choices=sorted(PATTERNS))
    args = parser.parse_args(argv)

    if args.command == "cleanup":
        for name in cleanup_stale():
            print(f"removed {name}")
    elif args.command == "list":
        for name in list_namespaces():
            if RUN_ID_RE.match(name):
                print(name)
    else:
        bed_plan = plan(PATTERNS[args.pattern]())
        for node in bed_plan.nodes.values():
            print(f"{node.kind} {node.name}")
            for iface in node.interfaces:
                addrs = " ".join(str(a) for a in (iface.ipv4, iface.ipv6) if a is not None)
                standby = "" if iface.up else "  (standby: down until the host moves here)"
                print(f"  {iface.ifname}: {addrs}{standby}")
            for route in node.routes:
                print(f"  route {route.destination} via {route.via} dev {route.dev}")
            if node.ruleset:
                print("  " + node.ruleset.strip().replace("\n", "\n  "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
