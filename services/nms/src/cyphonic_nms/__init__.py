"""cyphonic_nms."""
