"""cyphonic_testbed."""
