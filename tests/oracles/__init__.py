"""Hand-written references of upstream formulas, kept once and imported by every test that needs them.

Each function names, in its docstring, the upstream function (repository / file) it reproduces from the
reference notes in ``/work/shared/reference`` (facts only, re-written here, never pasted). Modules:

- :mod:`oracles.nn`: RMSNorm (plain and Gemma ``1 + w``), openpi adaRMS, half-split RoPE, masked softmax
  attention, a per-token Mixture-of-Transformers layer, transformers' SigLIP vision model.
- :mod:`oracles.bagel`: BAGEL's per-sample attention mask, CFG and the guided Euler chain, latent patchify,
  the DiT timestep sinusoid and MAE 2-D sin-cos table, the Qwen2-MoT decoder stack by suffixed weight names.
- :mod:`oracles.openpi`: ``make_attn_mask``, ``posemb_sincos``, the Euler time grid, the suffix embedding
  (time conditioning), ``resize_with_pad`` and the PaliGemma-with-expert joint layer stack.
- :mod:`oracles.acot`: ACoT-VLA's action-guided prediction branch and the IAR per-layer pooling.
- :mod:`oracles.halo`: HALO's sequence-plan splits, RoPE and expert tables, its 1-D sin-cos table.

Tests import them as ``from oracles.openpi import make_attn_mask`` (pytest puts ``tests/`` on ``sys.path``).
"""
