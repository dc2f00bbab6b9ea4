"""Clients for the remote systems syncd talks to.

Connectors speak plain data (the dataclasses in :mod:`connectors.types`) and
raise the taxonomy in :mod:`connectors.errors`. Nothing here imports ``syncd``.
"""
