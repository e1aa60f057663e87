"""One decoder for every caller: formats, EXIF, colour modes, and refusals before decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from detserve.runtime import images as imagelib
from detserve.runtime.images import ImageError, Limits, decode
from tests.conftest import encode, orientation_exif


def gradient(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_exactly(fmt):
    image = gradient()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = decode(encode(image, fmt, **kwargs))
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, image)


def test_jpeg_decodes_close():
    image = gradient()
    out = decode(encode(image, "JPEG", quality=95))
    assert out.shape == image.shape
    assert np.abs(out.astype(int) - image).mean() < 4


@pytest.mark.parametrize("orientation,expect", [(1, lambda a: a), (3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(orientation, expect):
    image = gradient(40, 60)
    out = decode(encode(image, "PNG", orientation=orientation))
    np.testing.assert_array_equal(out, expect(image))


def photo_like(h: int = 157, w: int = 203, seed: int = 3) -> np.ndarray:
    """Odd sides, edges and noise: what exercises every IDCT, upsampling and colour path of a JPEG decoder."""
    noise = np.random.default_rng(seed).integers(0, 60, (h, w, 3))
    return np.clip(np.asarray(Image.fromarray(gradient(h, w)).rotate(17)) + noise, 0, 255).astype(np.uint8)


def pillow_pixels(data: bytes) -> np.ndarray:
    """Pillow alone: the decoder every box of detserve was first made equal with."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


@pytest.mark.parametrize(
    "save",
    [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2}, {"subsampling": 2, "quality": 40},
     {"progressive": True}, {"progressive": True, "subsampling": 0, "quality": 97}, {"optimize": True}],
)  # fmt: skip
def test_a_plain_jpeg_decodes_without_the_gil_to_pillows_own_pixels(save):
    data = _jpeg(photo_like(), **save)
    assert imagelib._jpeg_without_gil(data, Image.open(io.BytesIO(data))) is not None  # OpenCV's path was taken
    np.testing.assert_array_equal(decode(data), pillow_pixels(data))


def test_a_gray_jpeg_decodes_without_the_gil_to_pillows_own_pixels():
    data = _jpeg(photo_like(), mode="L")
    assert imagelib._jpeg_without_gil(data, Image.open(io.BytesIO(data))) is not None
    out = decode(data)
    np.testing.assert_array_equal(out, pillow_pixels(data))
    assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("orientation", range(0, 10))
def test_every_exif_orientation_of_a_jpeg_turns_as_pillow_turns_it(orientation):
    data = _jpeg(photo_like(61, 90), orientation)
    out = decode(data)
    np.testing.assert_array_equal(out, pillow_pixels(data))
    assert out.shape[:2] == ((90, 61) if orientation in (5, 6, 7, 8) else (61, 90))


def test_jpegs_opencv_does_not_take_go_to_pillow():
    cmyk, whole = _jpeg(photo_like(), mode="CMYK"), _jpeg(photo_like())
    trailing, truncated = whole + b"\0" * 16, whole[: len(whole) * 2 // 3]
    for data in (cmyk, trailing, truncated):
        assert imagelib._jpeg_without_gil(data, Image.open(io.BytesIO(data))) is None
    np.testing.assert_array_equal(decode(cmyk), pillow_pixels(cmyk))
    np.testing.assert_array_equal(decode(trailing), pillow_pixels(whole))
    with pytest.raises(ImageError) as err:  # libjpeg would pad it with gray; Pillow refuses it
        decode(truncated)
    assert err.value.code == "corrupt_image"


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    base = Image.fromarray(gradient())
    if mode in ("I;16", "I", "F"):
        gray = np.asarray(base.convert("L"), dtype=np.uint16)
        image = Image.fromarray((gray.astype(np.uint16) * 257) if mode == "I;16" else gray.astype(np.int32 if mode == "I" else np.float32), mode=None)
        if mode == "I;16":
            image = Image.fromarray(gray * 257).convert("I;16") if image.mode != "I;16" else image
    else:
        image = base.convert(mode)
    out = decode(image)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16", "I", "F"):
        expected = np.asarray(base.convert("L"))
        assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
        assert (out[..., 0] == out[..., 1]).all()


def test_sixteen_bit_png_roundtrip():
    gray = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    out = decode(buf.getvalue())
    assert out.shape == (48, 64, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_arrays_are_taken_as_rgb_rgba_or_gray():
    image = gradient()
    np.testing.assert_array_equal(decode(image), image)
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(decode(rgba), image)
    gray = image[..., 0]
    assert decode(gray).shape == image.shape
    with pytest.raises(ImageError) as err:
        decode(np.zeros((4, 4, 5), np.uint8))
    assert err.value.code == "bad_array"


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", "empty"),
        (b"definitely not an image", "not_an_image"),
        (encode(gradient(), "JPEG")[:200], "corrupt_image"),
        (encode(gradient(), "PNG")[:-30], "corrupt_image"),
        (12345, "unsupported_type"),
    ],
)
def test_bad_inputs_raise_image_error_with_a_code(data, code):
    with pytest.raises(ImageError) as err:
        decode(data)
    assert err.value.code == code
    assert err.value.message


def test_pixel_limit_is_checked_from_the_header_before_decoding(monkeypatch):
    big = encode(np.zeros((300, 400, 3), np.uint8), "PNG")
    # If the limit were checked after decoding, load() would be called: make it fail loudly.
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    with pytest.raises(ImageError) as err:
        decode(big, Limits(max_pixels=100_000))
    assert err.value.code == "too_many_pixels" and "120000" in err.value.message


def test_byte_limit():
    with pytest.raises(ImageError) as err:
        decode(encode(gradient(), "PNG"), Limits(max_bytes=100))
    assert err.value.code == "too_large"


def test_bad_bytes_stay_a_clean_error_after_ultralytics_patches_pil():
    import ultralytics.utils.patches  # noqa: F401  (replaces PIL.Image.open)

    assert Image.open.__module__ != "PIL.Image"
    with pytest.raises(ImageError) as err:
        decode(b"definitely not an image")
    assert err.value.code == "not_an_image"
    np.testing.assert_array_equal(decode(encode(gradient())), gradient())


def _jpeg(array: np.ndarray, orientation: int | None = None, mode: str = "RGB", **save) -> bytes:
    """``array`` as a JPEG in ``mode`` (quality 90 unless ``save`` says), with an EXIF orientation if given."""
    out = io.BytesIO()
    save = {"quality": 90, **save}
    if orientation is not None:
        save["exif"] = orientation_exif(orientation)
    Image.fromarray(array).convert(mode).save(out, "JPEG", **save)
    return out.getvalue()


def test_reduced_decode_scales_a_large_jpeg_in_the_dct_and_reports_the_full_size():
    from detserve.runtime.images import decode_reduced

    photo = np.asarray(Image.fromarray(gradient()).resize((2000, 1500)))
    pixels, full = decode_reduced(_jpeg(photo), Limits(), 320)
    assert full == (1500, 2000)
    assert pixels.shape == (375, 500, 3)  # 1/4: the smallest scale with both sides >= 320
    assert np.abs(pixels.astype(int) - decode(np.asarray(Image.fromarray(photo).resize((500, 375)))).astype(int)).mean() < 8
    # Orientation 6 (a quarter turn): the full size turns with the pixels.
    pixels, full = decode_reduced(_jpeg(photo, 6), Limits(), 320)
    assert full == (2000, 1500) and pixels.shape == (500, 375, 3)
    # Not reduced: a JPEG under twice the size, any PNG, no min_side.
    small = np.asarray(Image.fromarray(gradient()).resize((600, 500)))
    assert decode_reduced(_jpeg(small), Limits(), 320)[0].shape == (500, 600, 3)
    assert decode_reduced(encode(photo), Limits(), 320)[0].shape == (1500, 2000, 3)
    assert decode_reduced(_jpeg(photo), Limits(), None)[0].shape == (1500, 2000, 3)


def test_a_reduced_decode_gives_the_exact_paths_boxes_on_the_full_image(yolo_export, scenes):
    """The geometry maps boxes from the reduced pixels back to the full photo: they land where the exact path puts them."""
    from detserve.export.parity import compare
    from detserve.runtime.detector import Detector
    from detserve.serve.batching import prepare

    detector = Detector(yolo_export)
    params = detector.params()
    matched = total = 0
    for scene in scenes[:4]:
        big = _jpeg(np.asarray(Image.fromarray(scene.image).resize((scene.image.shape[1] * 6, scene.image.shape[0] * 6))))
        exact, fast = prepare(detector, big, Limits()), prepare(detector, big, Limits(), fast_decode=True)
        assert (fast.height, fast.width) == (exact.height, exact.width)
        assert fast.prepared.pixels.shape == exact.prepared.pixels.shape
        [a], [b] = detector.run([exact.prepared], params), detector.run([fast.prepared], params)
        parity = compare(a, b, iou=0.8)  # the export's own matching: one to one, same class
        matched, total = matched + parity.matched, total + parity.source_boxes
    assert total > 0 and matched / total >= 0.8, (matched, total)  # a wrong geometry would match none


def test_probe_reads_a_pngs_size_and_orientation_without_decoding_it(monkeypatch):
    """Admission reads pixels from headers (serve/admission.py): a PNG's getexif() would decode the whole image."""
    from PIL import ImageFile

    from detserve.runtime.images import admission_size, probe

    exif = Image.Exif()
    exif[0x0112] = 6
    turned, flat = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (40, 30)).save(turned, "PNG", exif=exif)
    Image.new("L", (3000, 2000), 128).save(flat, "PNG")
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size))  # counted, whoever catches
    assert probe(turned.getvalue()).orientation == 6
    assert admission_size(flat.getvalue()) == ("png", 6_000_000)
    assert probe(flat.getvalue()).orientation == 1
    assert loads == []


def test_probe_and_decode_refuse_a_bomb_with_the_same_words():
    """A header past twice Pillow's own limit (Pillow raises before detserve's check): both name its size."""
    import struct
    import zlib

    from detserve.runtime.images import ImageError, decode, probe

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    errors = []
    for read in (decode, probe):
        with pytest.raises(ImageError) as err:
            read(bomb)
        errors.append((err.value.code, err.value.message))
    assert errors[0] == errors[1] and errors[0][0] == "too_many_pixels" and "20000" in errors[0][1], errors
