"""Test support for the CYPHONIC workspace: never part of a product package or image.

- ``processes``: one helper to run a service CLI as a child process until /readyz answers
- ``nms``: NMS parts in process, registry helpers, ``NmsProcess``
- ``nms_client``: ``NmsProtocolClient``, a protocol-level NMS test tool (hand-made
  registrations, raw pushes counted), also a CLI; not an agent
- ``trs``: relay tokens, packets and relay CIDs inside aioquic
- ``agent``: the real agent with fake edges (TUN, netlink watcher, host addresses)
- ``cloud``: ``LoopbackCloud``, AS + NMS (+ TRS) processes on loopback and agents over fake
  edges enrolled at it
"""
