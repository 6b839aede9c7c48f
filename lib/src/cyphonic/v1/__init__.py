"""Generated protobuf code for cyphonic.v1 (do not edit; make proto)."""
