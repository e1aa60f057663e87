"""Decode JPEG bytes on the GPU in batches (nvJPEG through torchvision); the CPU takes what the device cannot.

``route`` reads only the header (Pillow's lazy open) and sends each input to:

- ``"device"``: baseline/extended JPEG, RGB (YCbCr) or grayscale, no EXIF
  rotation: ``torchvision.io.decode_jpeg(list_of_tensors, device="cuda")``
  decodes the whole list in one call;
- ``"cpu"`` with the reason: PNG and every other format, progressive JPEG
  (nvJPEG's batched decoder handles baseline only; torchvision would take them
  one by one), CMYK/YCCK JPEG, EXIF orientation other than 1 (the device
  decoder ignores it), and anything Pillow cannot read (the CPU decoder then
  raises the runtime's usual ``ImageError``). The CPU side is
  ``runtime.images.decode``, the one decoder.

Two upstream facts shape the code: on H100-class GPUs the decoder can write
memory that the caller's stream still reads (pytorch/vision#9606, never
merged), so the caller's stream is synchronised before every decode call; and
nvJPEG holds a process-wide lock, so one decode runs at a time per process
(:data:`DECODE_LOCK`), from one thread.

With ``device="cpu"`` the same routing runs and torchvision decodes the
"device" share on the CPU: that is how CI checks the routing and the outputs.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from detserve.runtime import images as imagelib

#: One nvJPEG decode at a time in this process (it locks internally anyway; this keeps callers from piling up threads).
DECODE_LOCK = threading.Lock()

EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Route:
    where: str  # "device" or "cpu"
    reason: str = ""


def route(data: bytes) -> Route:
    """Where ``data`` is decoded, from its header alone."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                return Route("cpu", f"{image.format or 'unknown'} is not JPEG")
            if image.info.get("progressive") or image.info.get("progression"):
                return Route("cpu", "progressive JPEG")
            if image.mode not in ("RGB", "L"):
                return Route("cpu", f"{image.mode} JPEG")
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            if orientation not in (0, 1):
                return Route("cpu", f"EXIF orientation {orientation}")
    except Exception as exc:  # the CPU decoder reports it with the runtime's error codes
        return Route("cpu", f"unreadable header ({type(exc).__name__})")
    return Route("device")


def decode_batch(
    blobs: Sequence[bytes], device: str | torch.device = "cuda", limits: imagelib.Limits = imagelib.Limits()
) -> tuple[list[torch.Tensor], list[Route]]:
    """``HxWx3`` uint8 tensors on ``device``, one per blob in order, and where each was decoded.

    Pixel limits are checked from the header for every input (as the CPU decoder does) before any decode.
    """
    import torchvision.io

    device = torch.device(device)
    routes = [route(b) for b in blobs]
    out: list[torch.Tensor | None] = [None] * len(blobs)
    on_device = [i for i, r in enumerate(routes) if r.where == "device"]
    for i in on_device:  # same limits as the CPU path, from the header
        with Image.open(io.BytesIO(blobs[i])) as image:
            imagelib._check_pixels(image.width, image.height, limits)
    if on_device:
        tensors = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in on_device]
        with DECODE_LOCK:
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # pytorch/vision#9606
            decoded = torchvision.io.decode_jpeg(tensors, mode=torchvision.io.ImageReadMode.RGB, device=device)
        for i, chw in zip(on_device, decoded):
            out[i] = chw.permute(1, 2, 0)
    for i, r in enumerate(routes):
        if r.where == "cpu":
            out[i] = torch.from_numpy(np.array(imagelib.decode(blobs[i], limits))).to(device)
    return out, routes  # type: ignore[return-value]


def as_numpy(images: Sequence[torch.Tensor]) -> list[np.ndarray]:
    return [im.cpu().numpy() for im in images]
