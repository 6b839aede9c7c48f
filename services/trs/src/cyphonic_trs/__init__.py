"""cyphonic_trs."""
