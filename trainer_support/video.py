"""Videos of games: frames upscaled, with the score burned in (evaluations' best games, play.py's recordings)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

def draw_frame(rgb: np.ndarray, score: Optional[float], scale: int = 3) -> np.ndarray:
    """An RGB game frame upscaled (nearest neighbour) with the score burned in: for videos and play's window."""
    import cv2
    h, w = rgb.shape[:2]
    big = cv2.resize(rgb, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    if score is not None:
        cv2.putText(big, f"{score:.0f}", (8, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 255), 2)
    return big


class VideoWriter:
    """H.264 MP4 (or GIF when the name ends in .gif) from RGB frames, upscaled, with the score burned in."""

    def __init__(self, path: str, fps: float = 60 / 4, scale: int = 3):
        import av
        self.path, self.scale = Path(path), scale
        self.path.parent.mkdir(parents=True, exist_ok=True)
        open(self.path, "ab").close()  # PyAV opens the file only at the first frame: fail here instead
        self.container = av.open(str(self.path), mode="w")
        gif = self.path.suffix.lower() == ".gif"
        self.stream = self.container.add_stream("gif" if gif else "libx264", rate=round(fps))
        self.stream.pix_fmt = "rgb8" if gif else "yuv420p"
        self.frames = 0

    def add(self, rgb: np.ndarray, score: Optional[float] = None) -> None:
        import av
        big = draw_frame(rgb, score, self.scale)
        if self.frames == 0:
            self.stream.width, self.stream.height = big.shape[1] // 2 * 2, big.shape[0] // 2 * 2
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(big[:self.stream.height, :self.stream.width]),
                                           format="rgb24")
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


class GameVideos:
    """One video per game played side by side, from their first frames `rgb`; `keep` keeps one as `path`."""

    def __init__(self, path: str, rgb: np.ndarray):
        self.path, self.tmp = path, Path(path).with_name(f".{Path(path).name}-games")
        self.writers = [VideoWriter(self.tmp / f"{i}.mp4") for i in range(len(rgb))]
        for w, frame in zip(self.writers, rgb):
            w.add(frame, 0)

    def add(self, rgb: np.ndarray, scores: np.ndarray, which: np.ndarray) -> None:
        for i in np.flatnonzero(which):
            self.writers[i].add(rgb[i], scores[i])

    def keep(self, i: int) -> None:
        for w in self.writers:
            w.close()
        os.replace(self.tmp / f"{i}.mp4", self.path)
        shutil.rmtree(self.tmp, ignore_errors=True)
