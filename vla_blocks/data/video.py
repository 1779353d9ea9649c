"""Video encoding and decoding with PyAV, the way lerobot 0.6.1 writes and reads camera streams.

Encoding (:func:`encode_video`): one mp4 per episode, ``libsvtav1`` (``g=2, crf=30, preset=12,
svtav1-params=fast-decode=0``, lerobot's defaults) or ``libx264`` where the FFmpeg build has no SVT-AV1,
``yuv420p``, stream rate = fps, so frame ``k`` has pts ``k/fps``. Several episodes share one file by
remuxing (:func:`concat_videos`, stream copy, no re-encode): timestamps run on and every episode starts
on a keyframe. Decoding (:func:`decode_frames`): seek to the keyframe at or before the earliest query, decode
forward, keep the nearest frame per query and raise :class:`FrameTimestampError` unless each is within
``tolerance_s``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ._deps import require

__all__ = ["FrameTimestampError", "pick_codec", "encode_video", "concat_videos", "decode_frames", "video_info",
           "ENCODER_DEFAULTS"]

#: lerobot 0.6.1's RGB encoder settings (RGBEncoderConfig)
ENCODER_DEFAULTS = {"g": 2, "crf": 30, "preset": 12, "fast_decode": 0}


class FrameTimestampError(ValueError):
    """A decoded frame is farther than ``tolerance_s`` from the queried time."""


def pick_codec(preferred: str = "libsvtav1") -> str:
    """``preferred`` when this PyAV build has the encoder, else ``libx264`` (named ``h264`` in info.json)."""
    av = require("av")
    have = av.codecs_available
    for c in (preferred, "libsvtav1", "libx264", "libaom-av1"):
        if c in have:
            return c
    raise RuntimeError(f"PyAV has none of the video encoders libsvtav1, libx264, libaom-av1 (have {sorted(have)[:20]}…)")


def _codec_options(codec: str) -> dict[str, str]:
    d = ENCODER_DEFAULTS
    if codec == "libsvtav1":
        return {"g": str(d["g"]), "crf": str(d["crf"]), "preset": str(d["preset"]),
                "svtav1-params": f"fast-decode={d['fast_decode']}"}
    if codec == "libx264":
        return {"g": str(d["g"]), "crf": str(23), "preset": "veryfast", "bf": "0"}
    return {"g": str(d["g"]), "crf": str(d["crf"])}


def encode_video(frames: Sequence[np.ndarray], path: str | Path, fps: int, codec: str = "libsvtav1",
                 pix_fmt: str = "yuv420p") -> dict:
    """Encode uint8 HWC RGB ``frames`` to ``path`` (mp4); returns the encoder settings written to info.json."""
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner to stderr otherwise (1 = errors only)
    av = require("av")
    if not len(frames):
        raise ValueError(f"{path}: no frames to encode")
    H, W = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream(codec, rate=int(fps), options=_codec_options(codec))
        stream.pix_fmt = pix_fmt
        stream.width, stream.height = W, H
        for k, img in enumerate(frames):
            if img.shape[:2] != (H, W) or img.dtype != np.uint8:
                raise ValueError(f"{path}: frame {k} is {img.dtype} {img.shape}, expected uint8 {(H, W, 3)}")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)
    info_codec = {"libsvtav1": "av1", "libaom-av1": "av1", "libx264": "h264"}.get(codec, codec)
    return {"codec": info_codec, "pix_fmt": pix_fmt, "encoder": codec}


def video_info(path: str | Path) -> dict:
    """Height, width, codec, pix_fmt, fps and duration (seconds) of the first video stream."""
    av = require("av")
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        dur = float(s.duration * s.time_base) if s.duration is not None else float(c.duration or 0) / 1e6
        return {"height": s.codec_context.height, "width": s.codec_context.width, "codec": s.codec_context.name,
                "pix_fmt": s.codec_context.pix_fmt, "fps": float(s.average_rate or s.base_rate), "duration": dur}


def concat_videos(parts: Sequence[str | Path], path: str | Path) -> list[float]:
    """Remux ``parts`` (same codec, size and time base) into ``path`` back to back, without re-encoding.

    Returns the start time (seconds) of each part in the output: the summed stream durations before it.
    """
    av = require("av")
    starts = []
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        ostream, tb, offset = None, None, 0  # offset in the parts' time base
        for part in parts:
            with av.open(str(part)) as inp:
                istream = inp.streams.video[0]
                if ostream is None:
                    ostream, tb = out.add_stream_from_template(istream, opaque=True), istream.time_base
                elif istream.time_base != tb:
                    raise ValueError(f"{part}: time base {istream.time_base} differs from {tb} of {parts[0]}")
                starts.append(float(offset * tb))
                end = 0
                for pkt in inp.demux(istream):
                    if pkt.dts is None:
                        continue
                    end = max(end, pkt.pts + (pkt.duration or 0))
                    pkt.pts += offset
                    pkt.dts += offset
                    pkt.stream = ostream
                    out.mux(pkt)
                offset += max(end, istream.duration or 0)
    return starts


_OPEN: "OrderedDict[tuple, Any]" = OrderedDict()
_MAX_OPEN = 16


def _container(av, path: str):
    """An open input container per (process, file), reused across calls (LRU of 16): opening costs more than
    decoding a frame of a small video. Keyed by pid so DataLoader workers never share a forked file handle, and
    by inode and mtime so a file replaced on disk (a writer appending an episode) is reopened."""
    st = os.stat(path)
    key = (os.getpid(), path, st.st_ino, st.st_mtime_ns)
    c = _OPEN.get(key)
    if c is None:
        c = av.open(path)
        _OPEN[key] = c
        while len(_OPEN) > _MAX_OPEN:
            _, old = _OPEN.popitem(last=False)
            if old is not c and key[0] == os.getpid():
                try:
                    old.close()
                except Exception:  # a container inherited from the parent process: leave it to the parent
                    pass
    else:
        _OPEN.move_to_end(key)
    return c


def decode_frames(path: str | Path, timestamps: Sequence[float], tolerance_s: float = 1e-4) -> torch.Tensor:
    """The frames of ``path`` nearest to ``timestamps`` (seconds) → float32 ``[T, 3, H, W]`` in [0, 1].

    Raises :class:`FrameTimestampError` naming the file when a frame is ``tolerance_s`` or more away.
    """
    av = require("av")
    ts = [float(t) for t in timestamps]
    first, last = min(ts), max(ts)
    got_t, got = [], []
    c = _container(av, str(path))
    s = c.streams.video[0]
    tb = float(s.time_base)
    c.seek(max(0, int(round(first / tb)) - 1), stream=s, backward=True, any_frame=False)
    for frame in c.decode(s):
        t = float(frame.pts * s.time_base)
        if t < first - tolerance_s - 1.0:  # far before the window (seek landed early)
            continue
        got_t.append(t)
        got.append(frame)  # converted to RGB only if it is the nearest to a query
        if t >= last:
            break
    if not got:
        raise FrameTimestampError(f"{path}: no frame decoded near t={first:.4f}s")
    times = np.asarray(got_t)
    out = []
    for t in ts:
        i = int(np.argmin(np.abs(times - t)))
        if abs(times[i] - t) >= tolerance_s:
            raise FrameTimestampError(f"{path}: the nearest frame to t={t:.4f}s is at {times[i]:.4f}s "
                                      f"({abs(times[i] - t):.4f} >= tolerance_s={tolerance_s})")
        out.append(i)
    rgb = {i: got[i].to_ndarray(format="rgb24") for i in set(out)}
    arr = torch.from_numpy(np.stack([rgb[i] for i in out])).permute(0, 3, 1, 2)
    return arr.float().div_(255.0)
