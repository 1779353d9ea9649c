"""Weights on the Hugging Face Hub (save / load / push). Filled in by the Hub issue."""

from __future__ import annotations


def load_model(ref, overrides):
    raise NotImplementedError(f"loading {ref.kind}:{ref.target} is not implemented yet (Hub issue)")


def load_config(ref, overrides):
    raise NotImplementedError(f"loading {ref.kind}:{ref.target} is not implemented yet (Hub issue)")
