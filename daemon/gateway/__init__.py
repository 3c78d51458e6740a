"""The gateway: one port for every model (issue 11). A process of its own, standard library only.

``http1`` frames HTTP/1.1 messages, ``routes`` maps a request to a service (or answers it),
``proxy`` moves the bytes, ``__main__`` runs it. See docs/gateway-design.md.
"""
