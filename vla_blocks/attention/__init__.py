"""Masked shared attention: mask metadata, tile summaries, and backend dispatch."""

from .dispatch import (AttentionBackend, AttentionInputs, BackendUnavailable, attention, backends, choose_backend,
                       explain, get_backend, register_backend)
from .meta import (FLAG_BIDIR, FLAG_NOISE, FLAG_VALID, TILE_EMPTY, TILE_FULL, TILE_PARTIAL, MaskMeta, TileSummary,
                   allowed_pairs)

__all__ = ["AttentionBackend", "AttentionInputs", "BackendUnavailable", "attention", "backends", "choose_backend",
           "explain", "get_backend", "register_backend", "MaskMeta", "TileSummary", "allowed_pairs", "FLAG_VALID",
           "FLAG_BIDIR", "FLAG_NOISE", "TILE_EMPTY", "TILE_PARTIAL", "TILE_FULL"]
