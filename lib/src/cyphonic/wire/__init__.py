"""The signalling wire format: frames of one ``pb.Envelope`` each, and message helpers.

``framing`` turns envelopes into bytes and back (size limit, version and body checks);
``messages`` wraps bodies into envelopes and checks the fields protobuf cannot.
The stream rules (which message may answer which) live in ``cyphonic.signalling``.
"""

from cyphonic.wire.framing import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    PROTOCOL_VERSION,
    FrameDecoder,
    decode_envelope,
    encode_frame,
)
from cyphonic.wire.messages import (
    body_name,
    body_name_of,
    endpoint_from_pb,
    endpoint_to_pb,
    ip_from_pb,
    unwrap,
    wrap,
)

__all__ = [
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "PROTOCOL_VERSION",
    "FrameDecoder",
    "body_name",
    "body_name_of",
    "decode_envelope",
    "encode_frame",
    "endpoint_from_pb",
    "endpoint_to_pb",
    "ip_from_pb",
    "unwrap",
    "wrap",
]
