"""Reading images the way annotation tools show them: EXIF orientation applied, any mode
(grayscale, RGBA, palette, 16-bit) turned into 8-bit RGB. Headers are read without decoding."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image

from detfit.errors import DetfitError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
TORCHVISION_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif"}
EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# PIL's format plugins signal a damaged file with many exception types (OSError, SyntaxError,
# EOFError, struct.error, IndexError, DecompressionBombError, ...): all mean "cannot read it".
BROKEN_FILE_ERRORS = (Exception,)
# The default of the max_pixels setting (detfit.config), and predict's limit: images above it are
# refused from their header, before a pixel is decoded.
DEFAULT_MAX_PIXELS = 50_000_000


def check_pixels(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise DetfitError(
            f"{path}: {width}x{height} image ({width * height / 1e6:.0f} MP) is larger than "
            f"max_pixels ({max_pixels / 1e6:g} MP); shrink it, or raise max_pixels"
        )


def error_text(exc: BaseException) -> str:
    """A library's message, first line only, without torchvision's C++ source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    parts = text.split(", ")
    if len(parts) >= 3 and ".cpp:" in parts[1]:  # "decode_jpeg, /path/decode_jpeg.cpp:171, msg"
        text = ", ".join(parts[2:])
    return text


@dataclass(frozen=True, slots=True)
class ImageHeader:
    width: int  # after EXIF orientation
    height: int
    mode: str  # PIL mode: RGB, L, RGBA, P, I;16, ...
    orientation: int = 1  # EXIF orientation tag (1: as stored)
    stored_size: tuple[int, int] | None = None  # (width, height) before orientation

    @property
    def exif_rotated(self) -> bool:
        return self.orientation != 1


def read_header(path: Path) -> ImageHeader:
    """Size (as displayed) and mode from the file header; raises DetfitError if unreadable."""
    try:
        with warnings.catch_warnings():
            # detfit's own max_pixels decides, with a message naming the setting
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                orientation = im.getexif().get(EXIF_ORIENTATION, 1) if im.format == "JPEG" else 1
                mode = im.mode
    except FileNotFoundError:
        raise DetfitError(f"{path}: image file not found") from None
    except BROKEN_FILE_ERRORS as exc:
        raise DetfitError(f"{path}: unreadable image ({error_text(exc)})") from None
    stored = (width, height)
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: displayed width is stored height
        width, height = height, width
    return ImageHeader(width, height, mode, int(orientation or 1), stored)


def decode_check(path: Path) -> None:
    """Decode every pixel of ``path`` (PIL: fast, and threads run in parallel); DetfitError when
    the file is truncated or corrupt, as training's decode would fail on it."""
    try:
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError:
        raise DetfitError(f"{path}: image file not found") from None
    except BROKEN_FILE_ERRORS as exc:
        raise DetfitError(f"{path}: cannot decode image ({error_text(exc)})") from None


def load_rgb(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """uint8 [3, H, W], EXIF-oriented; 16-bit images keep their top 8 bits. An image of more
    than ``max_pixels`` is refused from its header (PIL reads the size without decoding)."""
    path = Path(path)
    if not path.is_file():
        raise DetfitError(f"{path}: image not found")
    try:
        if max_pixels is not None:  # the header's size, before a pixel is decoded
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    width, height = im.size
            check_pixels(path, width, height, max_pixels)
        if path.suffix.lower() in TORCHVISION_SUFFIXES:
            image = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        else:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                if im.mode in SIXTEEN_BIT_MODES:
                    array = np.asarray(im, dtype=np.uint32)
                    array = (array >> 8 if array.max() > 255 else array).astype(np.uint8)
                    im = Image.fromarray(array)
                image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    except DetfitError:  # too many pixels: already the one line
        raise
    except FileNotFoundError:
        raise DetfitError(f"{path}: image not found") from None
    except BROKEN_FILE_ERRORS as exc:
        raise DetfitError(f"{path}: cannot decode image ({error_text(exc)})") from None
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image.contiguous()


def load_mask_ids(path: Path) -> torch.Tensor:
    """An instance-id PNG as an int64 [H, W] tensor (8- or 16-bit; palette indices as ids)."""
    try:
        with Image.open(path) as im:
            array = np.asarray(im)
    except FileNotFoundError:
        raise DetfitError(f"{path}: mask file not found") from None
    except BROKEN_FILE_ERRORS as exc:
        raise DetfitError(f"{path}: unreadable mask ({error_text(exc)})") from None
    if array.ndim == 3:  # an RGB mask: ids in the first channel
        array = array[..., 0]
    if array.dtype.kind == "f" and not (
        np.isfinite(array).all() and (array == array.round()).all()
    ):
        raise DetfitError(f"{path}: unreadable mask (values are not whole instance ids)")
    return torch.from_numpy(array.astype(np.int64))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
