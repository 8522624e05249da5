"""Video in and out with PyAV (its wheels bundle FFmpeg): frames are decoded one at a time."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detfit.errors import DetfitError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class VideoReader:
    """uint8 [3,H,W] frames of a video's first stream, with its frame rate and frame count."""

    def __init__(self, path: Path) -> None:
        import av

        try:
            self.container = av.open(str(path))
            self.stream = self.container.streams.video[0]
        except (av.FFmpegError, IndexError, OSError) as exc:
            raise DetfitError(f"{path}: not a readable video ({_first_line(exc)})") from None
        self.path = path
        self.rate: Fraction = self.stream.average_rate or Fraction(25)
        self.frames: int = self.stream.frames or 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        import av

        try:
            for frame in self.container.decode(self.stream):
                yield torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
        except av.FFmpegError as exc:
            raise DetfitError(f"{self.path}: video decoding failed ({_first_line(exc)})") from None
        finally:
            self.container.close()


class VideoWriter:
    """H.264 (libx264 where the FFmpeg build has it, else MPEG-4 Part 2) at the source's rate."""

    def __init__(self, path: Path, rate: Fraction, width: int, height: int) -> None:
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.container: Any = av.open(str(path), mode="w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height = width - width % 2, height - height % 2
        self.stream.pix_fmt = "yuv420p"

    def write(self, frame: torch.Tensor) -> None:
        import av

        array = frame.permute(1, 2, 0).numpy()[: self.stream.height, : self.stream.width]
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
        for packet in self.stream.encode(video_frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
