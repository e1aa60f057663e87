"""Pictures of detections, for people who would rather look than read."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from detserve.runtime.postprocess import Detections

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def draw_boxes(image: np.ndarray, det: Detections, labels: dict[int, str]) -> Image.Image:
    """The image with each box outlined and captioned "label score", one colour per class."""
    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(11, min(canvas.size) // 40))
    width = max(2, min(canvas.size) // 250)
    for (x1, y1, x2, y2), score, cls in zip(det.boxes.tolist(), det.scores.tolist(), det.class_ids.tolist()):
        colour = PALETTE[int(cls) % len(PALETTE)]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        caption = f"{labels.get(int(cls), str(cls))} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), caption, font=font)
        y = y1 - (bottom - top) - 4 if y1 - (bottom - top) - 4 >= 0 else y1
        draw.rectangle((x1, y, x1 + right - left + 4, y + bottom - top + 4), fill=colour)
        draw.text((x1 + 2, y + 1), caption, fill=(255, 255, 255), font=font)
    return canvas
