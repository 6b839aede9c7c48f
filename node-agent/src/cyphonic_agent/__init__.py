"""cyphonic_agent."""
