"""Slipstream: open high-speed file transfer over encrypted, rate-controlled UDP."""

__version__ = "0.1.0"
