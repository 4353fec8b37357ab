"""Slipstream: open high-speed file transfer over encrypted, rate-controlled UDP.

The Python API: ``await slipstream.transfer(spec, on_event=...)`` and the blocking
``slipstream.transfer_sync(spec, on_event=...)``; both take a TransferSpec or its dict.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "transfer", "transfer_sync"]


def __getattr__(name: str) -> Any:
    # Imported lazily so `slipstream --version` and light tools do not load the engine.
    if name in ("transfer", "transfer_sync"):
        from slipstream.engine import job

        return getattr(job, name)
    raise AttributeError(name)
