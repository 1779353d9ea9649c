"""Lazy imports of the ``data`` extra (pyarrow, PyAV): a missing one names the extra to install."""

from __future__ import annotations

import importlib

_EXTRA = {"pyarrow": "data", "pyarrow.parquet": "data", "pyarrow.compute": "data", "av": "data", "PIL": "data",
          "pandas": "data"}


def require(module: str):
    """``importlib.import_module(module)``, or an ImportError that says ``pip install 'vla-blocks[data]'``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        extra = _EXTRA.get(module, "data")
        raise ModuleNotFoundError(f"{module} is needed to read and write LeRobot datasets: "
                                  f"pip install 'vla-blocks[{extra}]' ({e})") from e
