"""Fixtures shared by the whole suite. Area-specific fixtures live in each area's conftest."""

# --- network-namespace test beds (root, ip netns, nftables) -----------------------------------
# Gives every test the `netbed` factory fixture (cyphonic_testbed.pytest_plugin), marks the tests
# under tests/netns/ with `netns`, and makes a `netns` test fail with a clear message when the
# machine cannot host namespaces (not root, iproute2/nftables missing).
pytest_plugins = ["cyphonic_testbed.pytest_plugin"]
# --- end of network-namespace test beds ------------------------------------------------------
