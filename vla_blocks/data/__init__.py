"""Data: LeRobotDataset v3.0 / v2.1 reading and writing, normalisation statistics, per-policy processors.

Everything here needs the ``data`` extra (``pip install 'vla-blocks[data]'``: pyarrow, PyAV); a missing
dependency raises an error naming it. Public names are imported lazily.

    from vla_blocks.data import LeRobotDataset, make_processor
    ds = LeRobotDataset("path/to/dataset", delta_timestamps={"action": [k / 10 for k in range(5)]})
    proc = make_processor(model, ds.meta, stats=ds.meta.stats)
    batch = proc([ds[0], ds[1]])
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LeRobotDataset": "dataset", "LeRobotDatasetWriter": "dataset", "DatasetMeta": "dataset",
    "ShuffleSampler": "dataset", "resolve_root": "dataset",
    "PolicyProcessor": "processor", "ProcessorConfig": "processor", "make_processor": "processor",
    "ImageAugmentation": "processor", "char_tokenizer": "processor",
    "compute_dataset_stats": "stats", "StreamingStats": "stats", "episode_stats": "stats",
    "aggregate_stats": "stats", "to_openpi": "stats", "from_openpi": "stats",
    "FrameTimestampError": "video", "encode_video": "video", "decode_frames": "video",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        mod = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
