"""Test support for the CYPHONIC workspace: never part of a product package or image.

- ``processes``: one helper to run a service CLI as a child process until /readyz answers
- ``nms``: NMS parts in process, registry helpers, ``NmsProcess``
- ``simnode``: a bare NMS protocol client (register, route requests, pushes), also a CLI
- ``trs``: relay tokens, packets and relay CIDs inside aioquic
- ``agent``: the real agent with fake edges (TUN, netlink watcher, host addresses)
"""
