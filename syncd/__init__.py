"""syncd: keeps consent in step between messaging platforms and CRMs."""

__version__ = "0.1.0"
