"""The pure core: bytes and data in, bytes and data out. No sockets, no database, no clock unless passed in.

Nothing in this package imports from the shell modules of `relay` (smtp, queue, store, tracking, ...).
"""
