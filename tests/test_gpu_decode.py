"""GPU JPEG decode routing (runtime/gpu_decode.py), checked on the CPU: which images go where, and what comes out."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from detserve.runtime import images as imagelib
from detserve.runtime.gpu_decode import decode_batch, route
from tests.conftest import encode


def jpeg_with_orientation(image: np.ndarray, orientation: int) -> bytes:
    return encode(image, "JPEG", quality=95, orientation=orientation)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    base = np.kron(rng.integers(0, 255, (12, 16, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # blocky: JPEG-friendly
    return base


def test_routing_sends_only_plain_baseline_jpegs_to_the_device(picture):
    cmyk = io.BytesIO()
    Image.fromarray(picture).convert("CMYK").save(cmyk, format="JPEG")
    cases = {
        "baseline": (encode(picture, "JPEG", quality=95), "device", ""),
        "gray": (encode(picture[..., 0], "JPEG"), "device", ""),
        "orientation 1": (jpeg_with_orientation(picture, 1), "device", ""),
        "png": (encode(picture, "PNG"), "cpu", "PNG is not JPEG"),
        "progressive": (encode(picture, "JPEG", progressive=True), "cpu", "progressive JPEG"),
        "cmyk": (cmyk.getvalue(), "cpu", "CMYK JPEG"),
        "rotated": (jpeg_with_orientation(picture, 6), "cpu", "EXIF orientation 6"),
        "garbage": (b"not an image", "cpu", "unreadable header"),
    }
    for name, (data, where, reason) in cases.items():
        r = route(data)
        assert r.where == where, name
        assert reason in r.reason, (name, r.reason)


def test_decode_batch_on_cpu_matches_the_cpu_decoder(picture):
    blobs = [encode(picture, "JPEG", quality=95), encode(picture, "PNG"), jpeg_with_orientation(picture, 6),
             encode(picture, "JPEG", progressive=True), encode(picture[..., 0], "JPEG")]  # fmt: skip
    decoded, routes = decode_batch(blobs, device="cpu")
    assert [r.where for r in routes] == ["device", "cpu", "cpu", "cpu", "device"]
    for blob, got in zip(blobs, decoded):
        expected = imagelib.decode(blob)
        assert got.dtype == torch.uint8 and tuple(got.shape) == expected.shape  # EXIF rotation applied: 120x160 -> 160x120
        # libjpeg (torchvision) vs Pillow's libjpeg-turbo settings: the same decoder family, a few levels at most.
        assert np.abs(got.numpy().astype(int) - expected.astype(int)).max() <= 3
    assert tuple(decoded[2].shape) == (160, 120, 3)


def test_decode_batch_checks_pixel_limits_before_decoding(picture):
    with pytest.raises(imagelib.ImageError) as err:
        decode_batch([encode(picture, "JPEG")], device="cpu", limits=imagelib.Limits(max_pixels=100))
    assert err.value.code == "too_many_pixels"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for nvJPEG (none visible)")
def test_gpu_decode_is_stable_over_many_iterations(picture):
    """pytorch/vision#9606: decoding must never overwrite what the caller's stream still reads."""
    blobs = [encode(np.roll(picture, k, axis=1), "JPEG", quality=95) for k in range(16)]
    first, _ = decode_batch(blobs, device="cuda")
    reference = [t.clone() for t in first]
    for _ in range(200):
        again, _ = decode_batch(blobs, device="cuda")
        total = sum(t.float().sum() for t in again)  # work on the stream while the next decode comes
        assert all(torch.equal(a, r) for a, r in zip(again, reference)) and total > 0
