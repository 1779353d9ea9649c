"""The project's exception types, defined once.

Every type derives from a builtin (``ValueError`` mostly), so code that already catches ``ValueError`` keeps
working; each carries the offending ``key`` (a batch key, a statistics key, a key path, a filter) so callers
and tests can tell which input was wrong without parsing the message.

- :class:`ConfigError` (``ValueError``): a recipe, override or model reference is malformed (also importable as
  ``vla_blocks.config.ConfigError``).
- :class:`BatchError` (``ValueError``): a policy batch breaks the model's declared batch contract
  (:mod:`vla_blocks.batch`): a missing key, a wrong shape / dtype / range, NaN or Inf, batch sizes that disagree.
  A missing key is a :class:`MissingKeyError`, also a ``KeyError``.
- :class:`StatsError` (``ValueError``): normalisation statistics that are non-finite, have a negative std, do
  not match the data's width, or come in a layout that is not understood.
- :class:`LoadError` (``ValueError``): a load option that selects nothing (``only=["lm.stak"]``) or makes no
  sense for the reference. Weight mismatches and corrupt files have their own types in :mod:`vla_blocks.hub`
  (``WeightsMismatchError``, ``CorruptCheckpointError``), also ``ValueError`` subclasses.
"""

from __future__ import annotations

__all__ = ["ConfigError", "VLAError", "BatchError", "MissingKeyError", "StatsError", "LoadError"]


class ConfigError(ValueError):
    """A recipe or override is malformed; the message names the file, the key path and suggestions.

    ``key`` is the offending key path (``backbone.config.num_key_value_heads``) where one is known, else None."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class VLAError(ValueError):
    """Base of the errors below: ``key`` names the offending input (None when there is no single one)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class BatchError(VLAError):
    """A batch does not match the model's batch schema; ``key`` is the batch key."""


class MissingKeyError(BatchError, KeyError):
    """A required batch key is absent: a :class:`BatchError` that is also a ``KeyError`` (code that caught the
    bare ``KeyError: 'images'`` of earlier versions keeps working); ``str()`` is the message, not its repr."""

    __str__ = BatchError.__str__


class StatsError(VLAError):
    """Normalisation statistics are unusable; ``key`` is the statistics key (``actions``, ``state``…)."""


class LoadError(VLAError):
    """A load option selects nothing or does not apply; ``key`` is the option (``only``, ``strict``…)."""
