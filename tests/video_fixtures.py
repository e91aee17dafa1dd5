"""Videos of the kinds players show and our decoders once got wrong (issue 17), written with PyAV in the test.

Each has sides that are multiples of 28 (except `tiny`), so neither runtime resizes and both must give the same
pixels. Shared by tests/test_bad_inputs.py and cpp/tests/inputs.py (the C++ CLI against the Python paths).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

W, H = 112, 56


def _picture(i: int, w: int, h: int) -> np.ndarray:
    """A colour per frame and a white block in the top-left corner: any rotation or mirror moves it."""
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = ((40 + 23 * i) % 256, (90 + 7 * i) % 256, (200 - 11 * i) % 256)
    img[: h // 2, : w // 4] = 250
    return img


def _write(path: Path, codec: str, fmt: str | None, times_ms: list[int], w: int = W, h: int = H, **kw) -> Path:
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=kw.get("rate", 8))
        s.width, s.height, s.pix_fmt = w, h, kw.get("pix_fmt", "yuv420p")
        if kw.get("timed", True):
            s.codec_context.time_base = Fraction(1, 1000)
        if kw.get("rotation"):
            s.set_display_rotation(kw["rotation"])
        for i, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(_picture(i, w, h), format="rgb24")
            if kw.get("timed", True):
                frame.pts, frame.time_base = t, Fraction(1, 1000)
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


CFR = [i * 125 for i in range(24)]  # 8 fps, 3 s
VFR = [i * 500 for i in range(6)] + [3000 + i * 40 for i in range(50)]  # 2 fps for 3 s, then 25 fps for 2 s


def write_all(folder: Path) -> dict[str, Path]:
    """name -> path of every fixture (written once into `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "vfr": _write(folder / "vfr.mp4", "libx264", None, VFR),
        "rotated-90": _write(folder / "rot90.mp4", "libx264", None, CFR, rotation=90),
        "rotated-270": _write(folder / "rot270.mp4", "libx264", None, CFR, rotation=270),
        "mpeg-ts": _write(folder / "clip.ts", "libx264", "mpegts", CFR),
        "annex-b": _write(folder / "clip.h264", "libx264", "h264", CFR, timed=False),
        "gif": _write(folder / "clip.gif", "gif", "gif", CFR, pix_fmt="rgb8"),
        "tiny": _write(folder / "tiny.mp4", "libx264", None, CFR, w=16, h=16),
    }


def write_animated_webp(folder: Path) -> Path:
    return _write(folder / "clip.webp", "libwebp_anim", "webp", CFR, timed=False)


def write_damaged(folder: Path, source: Path) -> Path:
    """An MPEG-TS copy with garbage over some packets' payload mid-file (headers kept: the demuxer still works)."""
    data = bytearray(source.read_bytes())
    rng = np.random.default_rng(17)
    for at in range(len(data) // 3, 2 * len(data) // 3, 188 * 7):  # every 7th 188-byte TS packet in the middle third
        data[at + 8 : at + 180] = rng.integers(0, 256, size=172, dtype=np.uint8).tobytes()
    path = folder / "damaged.ts"
    path.write_bytes(bytes(data))
    return path
