"""Request bodies that carry several images: ``multipart/form-data`` and detserve's JSON ``{"images": [...]}``.

Built once per payload, before a run, so that no client work is done per request.
"""

from __future__ import annotations

import base64
import json
from typing import Sequence

Headers = tuple[tuple[str, str], ...]

#: The peers' and the overload benchmark's boundary; the soak has its own (its reports name it).
BOUNDARY = "detservebenchboundary"


def multipart_body(files: Sequence[bytes], *, boundary: str = BOUNDARY, field: str = "image", filename: str = "image.jpg",
                   content_type: str = "image/jpeg") -> bytes:  # fmt: skip
    """One file part per image; ``filename`` may hold ``{i}``, the part's index."""
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename.format(i=i)}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode() + bytes(data) + b"\r\n"
        for i, data in enumerate(files)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def multipart_headers(boundary: str = BOUNDARY) -> Headers:
    return (("Content-Type", f"multipart/form-data; boundary={boundary}"),)


def multipart_request(images: bytes | Sequence[bytes], boundary: str = BOUNDARY) -> tuple[bytes, Headers]:
    """A multipart/form-data body with one JPEG file part per image (one ``image`` for bytes), and its headers."""
    files = [images] if isinstance(images, (bytes, bytearray)) else list(images)
    return multipart_body(files, boundary=boundary), multipart_headers(boundary)


def json_images_body(images: Sequence[bytes]) -> bytes:
    """detserve's JSON request body: ``{"images": [<base64>, ...]}``."""
    return json.dumps({"images": [base64.b64encode(image).decode() for image in images]}).encode()


JSON_HEADERS: Headers = (("Content-Type", "application/json"),)
