"""cyphonic_auth."""
