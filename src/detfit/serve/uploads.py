"""From an HTTP request to a uint8 image, with every limit checked as early as it can be: the
body's size while it streams in, the pixel count from the image header (before any decoding),
then the decoding itself through ``load_rgb``, the function ``detfit predict`` reads files with."""

from __future__ import annotations

import io
import tempfile
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from detfit.data.images import error_text, load_rgb

# load_rgb picks its decoder by the suffix: torchvision's for these formats, PIL's for any other
SUFFIX_OF_FORMAT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}
FILE_FIELDS = ("image", "file")  # the multipart field names looked at first


class UploadError(Exception):
    """A request the server refuses: the HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    name: str  # the upload's file name ("upload" for a raw body without one)
    data: bytes


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The image of a multipart form (field ``image``, ``file`` or the first file) or of a raw
    body. 413 as soon as more than ``max_bytes`` arrive; 400 for an empty or broken form."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise UploadError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > max_bytes:
            raise UploadError(413, f"upload of {declared} bytes: the limit is {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise UploadError(413, f"upload over {max_bytes} bytes: the limit is {max_bytes}")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _form_file(request, bytes(body), max_bytes)
    # any other body is the image itself, whatever it is labelled (curl --data-binary says
    # application/x-www-form-urlencoded): the header check tells an image from anything else
    if not body:
        raise UploadError(400, "empty request body: send an image")
    name = request.headers.get("x-filename") or "upload"
    return Upload(name, bytes(body))


async def _form_file(request: Request, body: bytes, max_bytes: int) -> Upload:
    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=4, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise UploadError(400, f"malformed multipart form: {exc.message}") from None
    files = {k: v for k, v in form.multi_items() if isinstance(v, UploadFile)}
    if not files:
        raise UploadError(400, "multipart form without a file: send the image as field 'image'")
    key = next((k for k in FILE_FIELDS if k in files), next(iter(files)))
    upload = files[key]
    try:
        data = await upload.read(max_bytes + 1)
    finally:
        for f in files.values():
            await f.close()
    if not data:
        raise UploadError(400, f"form field {key!r}: the file is empty")
    return Upload(upload.filename or key, data)


def check_header(data: bytes, max_pixels: int) -> str:
    """The image format, from the header alone: 415 when it is no image PIL knows, 413 when it
    has more than ``max_pixels`` pixels (a decompression bomb is refused before decoding)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # reads the header, decodes nothing
                width, height, fmt = im.width, im.height, im.format or ""
    except Image.DecompressionBombError as exc:
        raise UploadError(413, f"image too large: {error_text(exc)}") from None
    except UnidentifiedImageError:
        raise UploadError(
            415, "not an image (expected JPEG, PNG, WebP, BMP, TIFF or GIF)"
        ) from None
    except Exception as exc:  # a plugin's own parse error on a damaged header
        raise UploadError(400, f"unreadable image header ({error_text(exc)})") from None
    if width * height > max_pixels:
        raise UploadError(
            413, f"image of {width}x{height} = {width * height} pixels: the limit is {max_pixels}"
        )
    return fmt


def decode(data: bytes, fmt: str) -> torch.Tensor:
    """uint8 [3,H,W] exactly as ``detfit predict`` reads the same file: the bytes go through a
    temporary file into ``load_rgb`` (same decoder, EXIF orientation and 16-bit handling)."""
    from detfit.errors import DetfitError

    suffix = SUFFIX_OF_FORMAT.get(fmt, ".pil")
    with tempfile.TemporaryDirectory(prefix="detfit-serve-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return load_rgb(path)
        except DetfitError as exc:
            reason = str(exc).split(": ", 1)[-1]  # without the temporary file's name
            raise UploadError(400, f"the image does not decode: {reason}") from None
