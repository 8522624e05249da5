"""The Penn-Fudan pedestrian dataset, as the tutorial defines it, plus download and verification."""

from __future__ import annotations

import shutil
import ssl
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import masks_to_boxes

from detfit.data.images import error_text
from detfit.errors import DetfitError
from detfit.paths import data_dir

PENNFUDAN_URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"
# The upenn server omits its intermediate certificate; the Internet Archive's raw copy is the fallback.
PENNFUDAN_MIRRORS = (PENNFUDAN_URL, "https://web.archive.org/web/2023id_/" + PENNFUDAN_URL)
PENNFUDAN_NUM_IMAGES = 170
PENNFUDAN_CLASSES = ("__background__", "person")


class PennFudanDataset(torch.utils.data.Dataset):
    """Penn-Fudan pedestrians with the tutorial's target contract.

    ``dataset[i]`` is ``(image, target)``: a uint8 ``tv_tensors.Image`` [3,H,W] and a dict with
    ``boxes`` (float32 [N,4] XYXY, derived from the instance masks), ``labels`` (int64, all 1),
    ``image_id`` (int64 [1]), ``area`` (the mask's pixel count, float32: COCO's convention, which
    APs/APm/APl use; the tutorial's own class used the box area), ``iscrowd`` (uint8 zeros) and
    ``masks`` (uint8 [N,H,W]). Boxes and masks are tv_tensors, so v2 transforms move them together.
    """

    classes = PENNFUDAN_CLASSES

    def __init__(self, root: str | Path, transforms: Callable | None = None) -> None:
        self.root = find_pennfudan_root(root)
        self.transforms = transforms
        self.imgs = sorted((self.root / "PNGImages").glob("*.png"))
        self.masks = sorted((self.root / "PedMasks").glob("*.png"))
        if len(self.imgs) != len(self.masks) or not self.imgs:
            raise DetfitError(
                f"{self.root}: expected one mask per image, found {len(self.imgs)} images in "
                f"PNGImages/ and {len(self.masks)} masks in PedMasks/"
            )

    def __len__(self) -> int:
        return len(self.imgs)

    def get_height_and_width(self, idx: int) -> tuple[int, int]:
        """Image size from the PNG header alone, for aspect-ratio grouping without decoding pixels."""
        with Image.open(self.imgs[idx]) as im:
            width, height = im.size
        return height, width

    def __getitem__(self, idx: int) -> tuple[Any, dict[str, torch.Tensor]]:
        img = _decode(self.imgs[idx], ImageReadMode.RGB)
        mask = _decode(self.masks[idx], ImageReadMode.UNCHANGED)[0]
        obj_ids = instance_ids(mask)
        masks = (mask[None] == obj_ids[:, None, None]).to(torch.uint8)
        boxes = masks_to_boxes(masks) if len(obj_ids) else torch.zeros((0, 4))
        canvas = (img.shape[-2], img.shape[-1])
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=canvas),
            "labels": torch.ones((len(obj_ids),), dtype=torch.int64),
            "image_id": torch.tensor([idx], dtype=torch.int64),
            "area": masks.flatten(1).sum(1).to(torch.float32),  # pixels, as COCO's area
            "iscrowd": torch.zeros((len(obj_ids),), dtype=torch.uint8),
            "masks": tv_tensors.Mask(masks),
        }
        image = tv_tensors.Image(img)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _decode(path: Path, mode: ImageReadMode) -> torch.Tensor:
    """torchvision's decode, as the tutorial's; a damaged file (changed since the check) is a
    DetfitError naming it, not a C++ error from inside a DataLoader worker."""
    try:
        return decode_image(str(path), mode=mode)
    except (OSError, RuntimeError, ValueError) as exc:
        raise DetfitError(f"{path}: cannot decode image ({error_text(exc)})") from None


def instance_ids(mask: torch.Tensor) -> torch.Tensor:
    """Sorted non-zero ids in an instance-id mask (bincount: ~30x faster than torch.unique here)."""
    counts = torch.bincount(mask.flatten().to(torch.int64), minlength=1)
    ids = counts.nonzero().flatten()
    return ids[ids != 0].to(mask.dtype)


def find_pennfudan_root(path: str | Path) -> Path:
    """Accept the PennFudanPed folder itself or a folder that contains it."""
    path = Path(path).expanduser()
    for candidate in (path, path / "PennFudanPed"):
        if (candidate / "PNGImages").is_dir() and (candidate / "PedMasks").is_dir():
            return candidate
    raise DetfitError(
        f"{path}: not a Penn-Fudan folder (expected PNGImages/ and PedMasks/ in it or in "
        f"{path / 'PennFudanPed'})"
    )


def verify_pennfudan(root: str | Path, expected: int | None = PENNFUDAN_NUM_IMAGES) -> Path:
    """Check the structure: every image has its mask, and (for the official archive) 170 of each.

    ``expected=None`` accepts any number of pairs: a user's own copy or a synthetic one.
    """
    root = find_pennfudan_root(root)
    images = sorted(p.stem for p in (root / "PNGImages").glob("*.png"))
    masks = sorted(p.stem.removesuffix("_mask") for p in (root / "PedMasks").glob("*_mask.png"))
    count_ok = expected is None or len(images) == expected
    if not count_ok or images != masks or not images:
        missing = sorted(set(images) ^ set(masks))[:3]
        wanted = f"{expected} images" if expected else "images"
        raise DetfitError(
            f"{root}: expected {wanted} with one mask each, found {len(images)} images and "
            f"{len(masks)} masks" + (f" (unmatched: {', '.join(missing)})" if missing else "")
        )
    return root


def _ssl_context() -> ssl.SSLContext:
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def _download(url: str, dest: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "detfit"})
    with (
        urllib.request.urlopen(request, context=_ssl_context(), timeout=timeout) as response,
        open(dest, "wb") as out,
    ):
        shutil.copyfileobj(response, out)


def safe_extract(archive: Path, dest: Path) -> None:
    """Unzip refusing absolute paths, '..' escapes and symlinks (zip-slip)."""
    dest = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            target = (dest / info.filename).resolve()
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if is_link or not target.is_relative_to(dest):
                raise DetfitError(f"{archive}: unsafe member {info.filename!r} refused")
        zf.extractall(dest)


def download_pennfudan(
    dest: str | Path | None = None, urls: tuple[str, ...] = PENNFUDAN_MIRRORS, timeout: float = 60
) -> Path:
    """Download and unpack PennFudanPed.zip into ``dest`` (default: detfit's data folder)."""
    dest = Path(dest) if dest is not None else data_dir()
    dest.mkdir(parents=True, exist_ok=True)
    errors = []
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / "PennFudanPed.zip"
        for url in urls:
            try:
                _download(url, archive, timeout)
                break
            except Exception as exc:  # network errors come in many types; report them all
                errors.append(f"{url}: {exc}")
        else:
            raise DetfitError(
                "could not download Penn-Fudan (" + "; ".join(errors) + "). Download "
                f"{PENNFUDAN_URL} yourself, unpack it, and pass --data-root PATH or put it in {dest}"
            )
        try:
            unpacked = Path(tmp) / "unpacked"
            safe_extract(archive, unpacked)
            verify_pennfudan(unpacked)
        except zipfile.BadZipFile as exc:
            raise DetfitError(f"{archive.name} from {url}: not a valid zip ({exc})") from exc
        final = dest / "PennFudanPed"
        if final.exists():
            shutil.rmtree(final)
        find_pennfudan_root(unpacked).rename(final)
    return final


def resolve_pennfudan(data_root: str | Path | None = None, download: bool = True) -> Path:
    """The verified Penn-Fudan folder: ``data_root`` if given, else the cache, downloading once."""
    if data_root is not None:  # the user's copy: any number of image/mask pairs
        return verify_pennfudan(data_root, expected=None)
    cached = data_dir() / "PennFudanPed"
    if cached.is_dir():
        return verify_pennfudan(cached)
    if not download:
        raise DetfitError(
            f"Penn-Fudan not found in {cached}; pass --data-root PATH or allow download"
        )
    return download_pennfudan(data_dir())


def summarize_pennfudan(root: str | Path) -> dict[str, Any]:
    """Counts and sizes, from the PNG headers and the instance-id masks."""
    dataset = PennFudanDataset(root)
    sizes = [dataset.get_height_and_width(i) for i in range(len(dataset))]
    per_image = []
    for mask_path in dataset.masks:
        per_image.append(len(instance_ids(decode_image(str(mask_path))[0])))
    heights, widths = zip(*sizes)
    return {
        "images": len(dataset),
        "instances": sum(per_image),
        "instances per image": f"min {min(per_image)}, mean {sum(per_image) / len(per_image):.2f}, "
        f"max {max(per_image)}",
        "height": f"{min(heights)}-{max(heights)} px",
        "width": f"{min(widths)}-{max(widths)} px",
        "classes": ", ".join(PENNFUDAN_CLASSES[1:]),
    }
