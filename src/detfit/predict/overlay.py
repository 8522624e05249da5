"""Overlays a person can read: one colour per object (never black), so that touching or
overlapping objects of one class stay apart; translucent masks, boxes and labels ("person 0.93",
"#4 person 0.93" for a tracked object, whose colour then follows its track from frame to frame)
on a filled background; a legend of the classes present; line width and text size scaled with the
image."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Qualitative, colour-blind-friendly first (Okabe-Ito), then Tableau's; all bright enough to read.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)
MASK_ALPHA = 0.45
UNTRACKED = (200, 200, 200)  # a detection no track holds (yet): light grey, no id
LEGEND_BACKGROUND = (32, 32, 32)


def class_colour(label: int) -> tuple[int, int, int]:
    """A class's colour in per-class plots (PR curves, label statistics): label 1 gets the first
    colour; the background (0) never appears in a prediction."""
    return PALETTE[(max(label, 1) - 1) % len(PALETTE)]


def instance_colour(key: int) -> tuple[int, int, int]:
    """The colour of object ``key``: its index in the image, or its track id in a video."""
    return PALETTE[key % len(PALETTE)]


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled scalable font


def text_size(height: int, width: int) -> int:
    """About 1/32 of the shorter side, at least 11 px: readable on 64 px and 4K images alike."""
    return max(11, round(min(height, width) / 32))


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels that touch a pixel outside it (4-neighbourhood)."""
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = (
        mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    )
    return mask & ~inner


def label_text(name: str, score: float | None, track_id: int | None = None) -> str:
    text = name if score is None else f"{name} {score:.2f}"
    return text if track_id is None else f"#{track_id} {text}"


def _legend(draw: ImageDraw.ImageDraw, names: Sequence[str], width: int, size: int) -> None:
    """The classes present and how many of each, in the top right corner."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    if not counts:
        return
    font = _font(max(11, round(size * 0.8)))
    lines = [f"{n} {name}" for name, n in sorted(counts.items())]
    boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
    pad = max(2, size // 5)
    line_height = max(b[3] for b in boxes) + pad
    box_width = max(b[2] for b in boxes) + 2 * pad
    x0 = max(0, width - box_width)
    draw.rectangle((x0, 0, width, line_height * len(lines) + pad), fill=LEGEND_BACKGROUND)
    for k, line in enumerate(lines):
        draw.text((x0 + pad, pad + k * line_height), line, fill=(255, 255, 255), font=font)


def draw_prediction(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: Sequence[int],
    scores: Sequence[float] | None,
    class_names: Sequence[str],
    masks: torch.Tensor | None = None,
    keypoints: torch.Tensor | None = None,
    track_ids: Sequence[int | None] | None = None,
    legend: bool = True,
) -> torch.Tensor:
    """uint8 [3,H,W] image with masks (bool [N,H,W]), boxes, labels and keypoints drawn, each
    object in its own colour (its track's with ``track_ids``), and a legend of the classes.
    ``scores=None`` (ground truth) labels each object with its class name alone."""
    pixels = image.permute(1, 2, 0).numpy().astype(np.float32)
    labels = [int(v) for v in labels]
    if track_ids is None:
        colours = [instance_colour(k) for k in range(len(labels))]
    else:
        colours = [UNTRACKED if t is None else instance_colour(t) for t in track_ids]
    if masks is not None and len(masks):
        # lowest score first, so the best detection's colour is the one on top where masks overlap
        order = (
            range(len(labels))
            if scores is None
            else sorted(range(len(labels)), key=lambda i: scores[i])
        )
        for k in order:
            m = masks[k].numpy()
            colour = np.asarray(colours[k], dtype=np.float32)
            pixels[m] = (1 - MASK_ALPHA) * pixels[m] + MASK_ALPHA * colour
            pixels[_outline(m)] = 0.6 * colour  # a darker edge tells touching instances apart
    canvas = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape[-2:]
    size = text_size(height, width)
    line = max(1, round(size / 8))
    font = _font(size)
    for k in range(len(labels)):
        colour = colours[k]
        x0, y0, x1, y1 = boxes[k].tolist()
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        if keypoints is not None and len(keypoints):
            r = max(2, line + 1)
            for x, y, v in keypoints[k].tolist():
                if v > 0:
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(0, 0, 0))
        score = None if scores is None else float(scores[k])
        text = label_text(class_names[k], score, None if track_ids is None else track_ids[k])
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * line, bottom - top + 2 * line
        tx = min(max(0.0, x0), max(0.0, width - tw))
        ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside it at the top edge
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=colour)
        draw.text((tx + line - left, ty + line - top), text, fill=_text_colour(colour), font=font)
    if legend:
        _legend(draw, class_names[: len(labels)], width, size)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)
