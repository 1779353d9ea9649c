"""openpi's wire format: msgpack with numpy arrays as tagged maps (``openpi_client.msgpack_numpy``).

An array travels as the map ``{b"__ndarray__": True, b"data": <raw bytes, C order>, b"dtype": <dtype.str>,
b"shape": <list>}`` and a numpy scalar as ``{b"__npgeneric__": True, b"data": <python value>, b"dtype": ...}``;
everything else is plain msgpack (str keys, str/bytes/int/float/bool/None, lists, maps). Object, void and
complex dtypes are refused on both sides (openpi refuses them to keep pickle out).

Unlike a bare ``np.ndarray(buffer=...)`` call, :func:`unpackb` checks every tagged array (dtype string,
shape, byte count) and raises :class:`WireError` naming the problem, so a malformed message becomes an error
reply instead of an exception deep in the server.
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    import msgpack
except ModuleNotFoundError as e:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError("vla_blocks.serve needs msgpack: pip install 'vla-blocks[serve]'") from e

__all__ = ["WireError", "packb", "unpackb", "to_wire"]

_REFUSED_KINDS = ("V", "O", "c")


class WireError(ValueError):
    """A message that is not valid msgpack-numpy."""


def _encode(obj: Any):
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _REFUSED_KINDS:
        raise WireError(f"cannot send numpy dtype {obj.dtype} (object, void and complex dtypes are not supported)")
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": list(arr.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    try:  # torch tensors go out as numpy arrays (torch is imported lazily: the client side may not have it)
        import torch
        if isinstance(obj, torch.Tensor):
            return _encode(obj.detach().cpu().numpy())
    except ModuleNotFoundError:  # pragma: no cover
        pass
    raise TypeError(f"cannot serialise {type(obj).__name__} with msgpack-numpy")


def _dtype(spec) -> np.dtype:
    if isinstance(spec, bytes):
        spec = spec.decode("ascii", "replace")
    if not isinstance(spec, str):
        raise WireError(f"array dtype must be a string such as '<f4', got {type(spec).__name__}")
    try:
        dt = np.dtype(spec)
    except TypeError as e:
        raise WireError(f"unknown array dtype {spec!r}") from e
    if dt.kind in _REFUSED_KINDS:
        raise WireError(f"array dtype {dt} is not accepted (object, void and complex dtypes are refused)")
    return dt


def _decode(obj: dict):
    if b"__ndarray__" in obj:
        for field in (b"data", b"dtype", b"shape"):
            if field not in obj:
                raise WireError(f"tagged array lacks its {field.decode()!r} field")
        dt = _dtype(obj[b"dtype"])
        shape = obj[b"shape"]
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise WireError(f"array shape must be a list of non-negative ints, got {shape!r}")
        data = obj[b"data"]
        if not isinstance(data, (bytes, bytearray)):
            raise WireError(f"array data must be bytes, got {type(data).__name__}")
        expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if len(data) != expected:
            raise WireError(f"array of shape {tuple(shape)} and dtype {dt} needs {expected} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dt).reshape(shape)
    if b"__npgeneric__" in obj:
        if b"data" not in obj or b"dtype" not in obj:
            raise WireError("tagged numpy scalar lacks its 'data' or 'dtype' field")
        try:
            return _dtype(obj[b"dtype"]).type(obj[b"data"])
        except (TypeError, ValueError, OverflowError) as e:
            raise WireError(f"bad numpy scalar: {e}") from e
    return obj


def packb(obj: Any) -> bytes:
    """Serialise ``obj`` (dicts, lists, numbers, strings, numpy arrays/scalars, torch tensors)."""
    return msgpack.packb(obj, default=_encode)


def unpackb(data: bytes) -> Any:
    """Deserialise one message; raises :class:`WireError` for anything that is not valid msgpack-numpy.
    Arrays are read-only views of the message buffer."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected a binary msgpack message, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_decode, strict_map_key=False)
    except WireError:
        raise
    except Exception as e:  # msgpack raises several unrelated types (ExtraData, FormatError, ValueError...)
        raise WireError(f"not a msgpack message: {type(e).__name__}: {e}") from e


def to_wire(obj: Any) -> Any:
    """Torch tensors → numpy arrays, recursively (what a reply holds before :func:`packb`)."""
    if isinstance(obj, dict):
        return {k: to_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_wire(v) for v in obj]
    try:
        import torch
        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().numpy()
    except ModuleNotFoundError:  # pragma: no cover
        pass
    return obj
