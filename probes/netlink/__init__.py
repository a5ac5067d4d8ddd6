"""Netlink readers: sockets via sock_diag, and network-namespace helpers."""
