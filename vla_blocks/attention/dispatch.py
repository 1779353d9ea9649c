"""Attention dispatch (xformers' pattern): an ordered list of backends that explain why they cannot run.

``attention(q, k, v, meta, backend="auto")`` takes the first registered backend with no reasons;
a named backend that cannot run raises :class:`BackendUnavailable` listing its reasons; if no
backend can run, the error lists every backend's reasons. ``sdpa`` runs everywhere and is last.

Layout of tensors: ``q [B, Hq, Nq, D]``, ``k, v [B, Hkv, Nk, D]`` (grouped-query attention when
``Hkv`` divides ``Hq``); ``meta`` is the :class:`MaskMeta` of the call. A cached prefix is passed
as ``prefix=(k_prefix, v_prefix)``: the keys of the call are then ``prefix ++ k`` and ``meta``'s
key side covers both (backends that cannot read two K/V sources concatenate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import Registry
from .meta import FLAG_VALID, MaskMeta


class BackendUnavailable(RuntimeError):
    """A named backend cannot run these inputs, or no backend can."""


@dataclass
class AttentionInputs:
    """The inputs of one masked attention call: ``q [B, Hq, Nq, D]``, ``k``/``v [B, Hkv, Nk, D]``, the mask metadata, an
    optional cached prefix ``(K, V)`` placed before ``k``/``v``, and the softmax scale (None: 1/√D)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    meta: MaskMeta
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None
    scale: float | None = None

    @property
    def needs_grad(self) -> bool:
        """Whether autograd will need gradients of any input (some backends are forward-only)."""
        ts = [self.q, self.k, self.v] + (list(self.prefix) if self.prefix is not None else [])
        return torch.is_grad_enabled() and any(t.requires_grad for t in ts)

    def full_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V with the prefix prepended along the sequence dim (``[B, Hkv, P + Nk, D]``)."""
        if self.prefix is None:
            return self.k, self.v
        kp, vp = self.prefix
        return torch.cat([kp, self.k], dim=2), torch.cat([vp, self.v], dim=2)

    def common_reasons(self) -> list[str]:
        """Shape checks every backend shares."""
        r = []
        q, k, v = self.q, self.k, self.v
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            return [f"q, k, v must be 4-D [B, H, N, D]; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"]
        B, Hq, Nq, D = q.shape
        if k.shape[1] == 0 or Hq % k.shape[1]:
            r.append(f"query heads {Hq} are not a multiple of kv heads {k.shape[1]}")
        if k.shape[:3] != v.shape[:3]:
            r.append(f"k {list(k.shape)} and v {list(v.shape)} disagree in batch, heads or length")
        if k.shape[0] != B or k.shape[3] != D:
            r.append(f"k {list(k.shape)} does not match q {list(q.shape)} in batch or head_dim")
        if self.prefix is not None:
            kp, vp = self.prefix
            if kp.dim() != 4 or vp.dim() != 4:
                return r + [f"prefix k, v must be 4-D; got {kp.dim()}-D, {vp.dim()}-D"]
            if kp.shape[:2] != k.shape[:2] or kp.shape[3] != k.shape[3] or vp.shape[:2] != v.shape[:2] \
                    or vp.shape[3] != v.shape[3] or kp.shape[2] != vp.shape[2]:
                r.append(f"prefix k {list(kp.shape)} / v {list(vp.shape)} do not match k {list(k.shape)} / "
                         f"v {list(v.shape)} (same batch, heads and head_dim; k and v of one length)")
        nk = k.shape[2] + (self.prefix[0].shape[2] if self.prefix is not None else 0)
        if self.meta.q_len != Nq or self.meta.k_len != nk or self.meta.batch_size != B:
            r.append(f"mask metadata is [{self.meta.batch_size}, {self.meta.q_len}, {self.meta.k_len}] "
                     f"but the inputs are B={B}, Nq={Nq}, Nk={nk}")
        return r


class AttentionBackend:
    """One way to compute masked attention. Subclasses set ``name`` and implement both methods."""

    name: str = "?"
    #: False for a backend that never reads K/V at invalid keys (it packs the valid tokens only); otherwise
    #: :func:`attention` zeroes them first, since a masked weight is 0 but 0 · NaN is NaN
    reads_invalid_keys: bool = True

    def not_supported_reasons(self, inp: AttentionInputs) -> list[str]:
        """Why this backend cannot run ``inp`` (empty list: it can); each reason names what is missing or wrong."""
        raise NotImplementedError

    def forward(self, inp: AttentionInputs) -> torch.Tensor:
        """The attention output ``[B, Hq, Nq, D]`` (rows with nothing to attend are 0)."""
        raise NotImplementedError

    def auto_skip_reasons(self, inp: AttentionInputs) -> list[str]:
        """Reasons to pass this backend over under ``backend="auto"`` although it could run (e.g. slower here)."""
        return []


def _check_backend(backend) -> None:
    if not isinstance(backend, AttentionBackend):
        raise TypeError(f"an attention backend must be an AttentionBackend, got {type(backend).__name__}")


#: The attention backends in the order ``auto`` tries them (a :class:`~vla_blocks.registry.Registry`: the
#: built-in ones register when ``vla_blocks.attention.builtin`` is imported; plug-ins through the entry-point
#: group ``vla_blocks.attention_backends``, e.g. a module calling :func:`register_backend`).
BACKENDS: Registry[AttentionBackend] = Registry("attention backend", group="vla_blocks.attention_backends",
                                                builtins=("vla_blocks.attention.builtin",), check=_check_backend)
_REGISTRY_VERSION = [0]  # bumped by register_backend: cached choices made before a registration are stale


def register_backend(backend: AttentionBackend, before: str | None = "sdpa") -> AttentionBackend:
    """Add a backend to the priority list, by default just before ``sdpa`` (which stays last); a backend of a
    registered name replaces it in place."""
    _REGISTRY_VERSION[0] += 1
    return BACKENDS.register(backend.name, backend, before=before, replace=True)


def backends() -> list[AttentionBackend]:
    """The registered backends in the order ``auto`` tries them."""
    return BACKENDS.values()


def get_backend(name: str) -> AttentionBackend:
    """The backend named ``name``; a ``KeyError`` (:class:`~vla_blocks.registry.UnknownNameError`) with the
    closest names and the known ones otherwise (``auto`` is a choice, not a backend)."""
    return BACKENDS.get(name)


def _signature(inp: AttentionInputs) -> tuple:
    """Everything a backend's reasons may read besides the metadata: dtype, device, shape and strides of each
    tensor, whether gradients are needed, the scale. The metadata is the cache's owner (one per batch)."""
    ts = [inp.q, inp.k, inp.v] + (list(inp.prefix) if inp.prefix is not None else [])
    return (tuple((t.dtype, t.device, tuple(t.shape), t.stride()) for t in ts), inp.prefix is not None,
            inp.needs_grad, inp.scale)


def choose_backend(inp: AttentionInputs, backend: str = "auto") -> AttentionBackend:
    """The backend that runs ``inp``: ``backend`` itself (an error listing its reasons if it cannot), or for
    ``"auto"`` the first with neither reasons nor auto-skip reasons.

    The choice is cached on the metadata (built once per batch, shared by every layer) per input signature
    (:func:`_signature`) and registry state, so backend probes (installed packages, plans) run once per batch.
    """
    key = ("backend_choice", backend, _REGISTRY_VERSION[0], _signature(inp))
    hit = inp.meta._cache.get(key)
    if hit is not None:
        return hit
    choice = _choose(inp, backend)
    inp.meta._cache[key] = choice
    return choice


def explain(inp: AttentionInputs) -> list[tuple[str, list[str]]]:
    """Per registered backend, in priority order: why ``auto`` would pass it over (empty: it would run).

    Lists every backend (not just those before the chosen one) — the dispatch reasons a user reads to see why
    a given path runs, e.g. why ``sdpa_blocks`` or the dense ``sdpa`` was picked."""
    return [(b.name, b.not_supported_reasons(inp) or b.auto_skip_reasons(inp)) for b in backends()]


def _choose(inp: AttentionInputs, backend: str) -> AttentionBackend:
    common = inp.common_reasons()
    if common:
        raise ValueError("attention inputs are malformed: " + "; ".join(common))
    if backend != "auto":
        b = get_backend(backend)
        reasons = b.not_supported_reasons(inp)
        if reasons:
            raise BackendUnavailable(f"attention backend {b.name!r} cannot run these inputs: " + "; ".join(reasons))
        return b
    all_reasons = {}
    for b in backends():
        reasons = b.not_supported_reasons(inp) or b.auto_skip_reasons(inp)
        if not reasons:
            return b
        all_reasons[b.name] = reasons
    raise BackendUnavailable("no attention backend can run these inputs:\n" +
                             "\n".join(f"  {n}: {'; '.join(r)}" for n, r in all_reasons.items()))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: MaskMeta, backend: str = "auto",
              prefix: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float | None = None) -> torch.Tensor:
    """Masked multi-head attention over the Layout mask. Returns ``[B, Hq, Nq, D]``; rows with nothing to attend are 0.

    Values at invalid keys (tokens whose layout validity is off: padding, a masked camera) never reach a valid
    row, whatever they hold (NaN, Inf): unless the backend packs valid tokens only, K and V are zeroed there
    before the call (a masked weight is exactly 0, but 0 · NaN would still be NaN). Their gradient is 0.
    """
    inp = AttentionInputs(q, k, v, meta, prefix, scale)
    b = choose_backend(inp, backend)
    if b.reads_invalid_keys:
        inp = zero_invalid_keys(inp)
    return b.forward(inp)


def _invalid_keys(meta: MaskMeta, at: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The invalid keys ``[B, Nk]`` of ``meta`` split at ``at`` (prefix | keys of the call), None for a part
    without any; computed once per batch and split."""
    def build():
        inv = (meta.k_flags & FLAG_VALID) == 0
        parts = (inv[:, :at], inv[:, at:])
        return tuple(p if bool(p.any()) else None for p in parts)
    return meta.cached(("invalid_keys", at), build)


def zero_invalid_keys(inp: AttentionInputs) -> AttentionInputs:
    """``inp`` with K and V (and the cached prefix's) zeroed at the invalid keys of its metadata (``inp`` itself
    when every key is valid)."""
    at = inp.prefix[0].shape[2] if inp.prefix is not None else 0
    inv_p, inv_k = _invalid_keys(inp.meta, at)
    if inv_p is None and inv_k is None:
        return inp

    def fill(t, inv):
        return t if inv is None else t.masked_fill(inv.to(t.device)[:, None, :, None], 0.0)
    prefix = None if inp.prefix is None else (fill(inp.prefix[0], inv_p), fill(inp.prefix[1], inv_p))
    return AttentionInputs(inp.q, fill(inp.k, inv_k), fill(inp.v, inv_k), inp.meta, prefix, inp.scale)
