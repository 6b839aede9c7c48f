"""CYPHONIC-over-QUIC shared library used by every service and the node agent."""
