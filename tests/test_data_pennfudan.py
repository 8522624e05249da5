"""PennFudanDataset: target contract, verification, safe unzip, download fallbacks, real data."""

from __future__ import annotations

import io
import re
import shutil
import ssl
import zipfile
from pathlib import Path

import certifi
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import masks_to_boxes

import detfit.data.pennfudan as pf
from detfit.data.pennfudan import (
    PENNFUDAN_URL,
    PennFudanDataset,
    download_pennfudan,
    find_pennfudan_root,
    resolve_pennfudan,
    safe_extract,
    summarize_pennfudan,
    verify_pennfudan,
)
from detfit.errors import DetfitError


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _full_size_zip(path: Path, num_images: int = 170) -> Path:
    """A PennFudanPed.zip-shaped archive: ``num_images`` 8x8 image/mask pairs, one instance each."""
    image = _png_bytes(np.full((8, 8, 3), 50, dtype=np.uint8))
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:6, 3:5] = 1
    mask_png = _png_bytes(mask)
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(num_images):
            name = f"FudanPed{i + 1:05d}"
            zf.writestr(f"PennFudanPed/PNGImages/{name}.png", image)
            zf.writestr(f"PennFudanPed/PedMasks/{name}_mask.png", mask_png)
    return path


def _instance_ids(mask_path: Path) -> np.ndarray:
    ids = np.unique(np.array(Image.open(mask_path)))
    return ids[ids != 0]


# --- the dataset on synthetic data -------------------------------------------------------------


def test_length_matches_files(synthetic_root):
    ds = PennFudanDataset(synthetic_root)
    assert len(ds) == 8
    assert [p.stem for p in ds.imgs] == [f"FudanPed{i:05d}" for i in range(1, 9)]
    assert [p.name for p in ds.masks] == [f"FudanPed{i:05d}_mask.png" for i in range(1, 9)]


@pytest.mark.parametrize("idx", range(8))
def test_item_contract(synthetic_root, idx):
    ds = PennFudanDataset(synthetic_root)
    image, target = ds[idx]

    pixels = np.array(Image.open(ds.imgs[idx]).convert("RGB"))
    mask = np.array(Image.open(ds.masks[idx]))
    ids = np.unique(mask)
    ids = ids[ids != 0]
    n, (h, w) = len(ids), mask.shape
    assert n >= 1
    assert list(ids) == list(range(1, n + 1))  # instance ids 1..n, as the real set has them

    assert type(image) is tv_tensors.Image
    assert image.dtype == torch.uint8
    assert image.shape == (3, h, w)
    assert torch.equal(image.as_subclass(torch.Tensor), torch.from_numpy(pixels).permute(2, 0, 1))

    assert set(target) == {"boxes", "labels", "image_id", "area", "iscrowd", "masks"}

    masks = target["masks"]
    assert type(masks) is tv_tensors.Mask
    assert masks.dtype == torch.uint8
    assert masks.shape == (n, h, w)
    for k, obj_id in enumerate(ids):
        expected = torch.from_numpy((mask == obj_id).astype(np.uint8))
        assert torch.equal(masks[k].as_subclass(torch.Tensor), expected)

    boxes = target["boxes"]
    assert type(boxes) is tv_tensors.BoundingBoxes
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert tuple(boxes.canvas_size) == (h, w)
    assert boxes.dtype == torch.float32
    assert boxes.shape == (n, 4)
    assert torch.equal(
        boxes.as_subclass(torch.Tensor), masks_to_boxes(masks.as_subclass(torch.Tensor))
    )
    for k, obj_id in enumerate(ids):  # and independently of torchvision: min/max pixel indices
        ys, xs = np.nonzero(mask == obj_id)
        assert boxes[k].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]

    assert target["labels"].dtype == torch.int64
    assert target["labels"].tolist() == [1] * n

    assert target["image_id"].dtype == torch.int64
    assert target["image_id"].shape == (1,)
    assert target["image_id"].item() == idx

    b = boxes.as_subclass(torch.Tensor)
    assert target["area"].dtype == torch.float32
    assert target["area"].shape == (n,)
    # COCO's convention (the mask's pixel count), as data convert and every mask format use
    assert torch.equal(target["area"], target["masks"].flatten(1).sum(1).float())
    assert (target["area"] <= (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)).all()
    assert (target["area"] > 0).all()

    assert target["iscrowd"].dtype == torch.uint8
    assert target["iscrowd"].tolist() == [0] * n


def test_transforms_are_applied(synthetic_root):
    calls = []

    def transforms(image, target):
        calls.append(target["image_id"].item())
        return "image", {"n": len(target["boxes"])}

    ds = PennFudanDataset(synthetic_root, transforms=transforms)
    assert ds[3] == ("image", {"n": len(_instance_ids(ds.masks[3]))})
    assert calls == [3]


def test_get_height_and_width_reads_no_pixels(synthetic_root, monkeypatch):
    ds = PennFudanDataset(synthetic_root)
    expected = [np.array(Image.open(p)).shape[:2] for p in ds.imgs]
    assert len(set(expected)) > 1  # the synthetic sizes vary, so a constant answer would fail

    def no_decoding(*args, **kwargs):
        raise AssertionError("decode_image called")

    monkeypatch.setattr(pf, "decode_image", no_decoding)
    with pytest.raises(AssertionError, match="decode_image called"):
        ds[0]  # the patch is live for the dataset's own decoding
    assert [ds.get_height_and_width(i) for i in range(len(ds))] == [tuple(s) for s in expected]


def test_mismatched_folder_rejected_by_dataset(synthetic_root, tmp_path):
    root = shutil.copytree(synthetic_root, tmp_path / "PennFudanPed")
    (root / "PedMasks" / "FudanPed00002_mask.png").unlink()
    with pytest.raises(DetfitError, match="8 images .* and 7 masks"):
        PennFudanDataset(root)


# --- verification and root finding ------------------------------------------------------------


def test_verify_synthetic_wants_170(synthetic_root):
    with pytest.raises(DetfitError) as info:
        verify_pennfudan(synthetic_root)
    message = str(info.value)
    assert "170" in message
    assert "found 8 images and 8 masks" in message
    assert str(synthetic_root) in message


def test_verify_names_unmatched_file(synthetic_root, tmp_path):
    root = shutil.copytree(synthetic_root, tmp_path / "PennFudanPed")
    (root / "PedMasks" / "FudanPed00005_mask.png").unlink()
    with pytest.raises(DetfitError, match=r"unmatched: FudanPed00005\)"):
        verify_pennfudan(root)


def test_verify_full_size_folder_and_unmatched_mask(tmp_path):
    with zipfile.ZipFile(_full_size_zip(tmp_path / "p.zip")) as zf:
        zf.extractall(tmp_path / "data")
    root = tmp_path / "data" / "PennFudanPed"
    assert verify_pennfudan(tmp_path / "data") == root
    # 170 images but one mask renamed: the count check alone would not catch it
    (root / "PedMasks" / "FudanPed00170_mask.png").rename(root / "PedMasks" / "Other_mask.png")
    with pytest.raises(DetfitError, match="unmatched: FudanPed00170, Other"):
        verify_pennfudan(root)


def test_find_root_accepts_folder_and_parent(synthetic_root):
    assert find_pennfudan_root(synthetic_root) == synthetic_root
    assert find_pennfudan_root(synthetic_root.parent) == synthetic_root
    assert len(PennFudanDataset(synthetic_root.parent)) == 8


def test_find_root_rejects_other_folder(tmp_path):
    (tmp_path / "PNGImages").mkdir()  # half a dataset is not one
    with pytest.raises(DetfitError) as info:
        find_pennfudan_root(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "not a Penn-Fudan folder" in str(info.value)
    with pytest.raises(DetfitError, match=re.escape(str(tmp_path / "missing"))):
        verify_pennfudan(tmp_path / "missing")


# --- safe_extract -----------------------------------------------------------------------------


def test_safe_extract_refuses_parent_escape(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("../evil.txt", "gotcha")
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(DetfitError, match=r"unsafe member '\.\./evil\.txt'"):
        safe_extract(archive, dest)
    assert not (tmp_path / "box" / "evil.txt").exists()
    assert list(dest.iterdir()) == []  # refused before anything is written


def test_safe_extract_refuses_absolute_and_symlink(tmp_path):
    absolute = tmp_path / "abs.zip"
    with zipfile.ZipFile(absolute, "w") as zf:
        zf.writestr(str(tmp_path / "outside.txt"), "x")
    with pytest.raises(DetfitError, match="unsafe member"):
        safe_extract(absolute, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()

    link = tmp_path / "link.zip"
    info = zipfile.ZipInfo("inside_link")
    info.external_attr = (0o120777 << 16) | 0
    with zipfile.ZipFile(link, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DetfitError, match="unsafe member 'inside_link'"):
        safe_extract(link, tmp_path / "dest2")
    assert not (tmp_path / "dest2" / "inside_link").exists()


def test_safe_extract_normal_zip(tmp_path):
    archive = tmp_path / "ok.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", "alpha")
        zf.writestr("sub/b.txt", "beta")
    dest = tmp_path / "dest"
    safe_extract(archive, dest)
    assert (dest / "a.txt").read_text() == "alpha"
    assert (dest / "sub" / "b.txt").read_text() == "beta"


# --- download ---------------------------------------------------------------------------------


URLS = ("https://first.invalid/PennFudanPed.zip", "https://second.invalid/PennFudanPed.zip")


def test_download_all_urls_fail(tmp_path, monkeypatch):
    tried = []

    def failing(url, dest, timeout):
        tried.append(url)
        raise OSError(f"no route to {url.split('/')[2]}")

    monkeypatch.setattr(pf, "_download", failing)
    dest = tmp_path / "cache"
    with pytest.raises(DetfitError) as info:
        download_pennfudan(dest, urls=URLS)
    message = str(info.value)
    assert tried == list(URLS)
    assert PENNFUDAN_URL in message
    assert "--data-root" in message
    assert "no route to first.invalid" in message and "no route to second.invalid" in message
    assert str(dest) in message
    assert list(dest.iterdir()) == []  # no PennFudanPed, no leftover temp folder


def test_download_falls_back_to_second_url(tmp_path, monkeypatch):
    source = _full_size_zip(tmp_path / "source.zip")
    tried = []

    def flaky(url, dest, timeout):
        tried.append(url)
        if url == URLS[0]:
            dest.write_bytes(b"partial garbage")  # a half-written file must not survive
            raise ssl.SSLError("certificate verify failed")
        shutil.copyfile(source, dest)

    monkeypatch.setattr(pf, "_download", flaky)
    dest = tmp_path / "cache"
    root = download_pennfudan(dest, urls=URLS)
    assert tried == list(URLS)
    assert root == dest / "PennFudanPed"
    assert verify_pennfudan(root) == root
    assert [p.name for p in dest.iterdir()] == ["PennFudanPed"]
    assert len(list((root / "PNGImages").glob("*.png"))) == 170
    image, target = PennFudanDataset(root)[169]
    assert image.shape == (3, 8, 8)
    assert target["boxes"].tolist() == [[3.0, 2.0, 4.0, 5.0]]


def test_download_replaces_old_copy(tmp_path, monkeypatch):
    source = _full_size_zip(tmp_path / "source.zip")
    monkeypatch.setattr(pf, "_download", lambda url, dest, timeout: shutil.copyfile(source, dest))
    dest = tmp_path / "cache"
    (dest / "PennFudanPed" / "stale").mkdir(parents=True)
    root = download_pennfudan(dest, urls=URLS[:1])
    assert not (root / "stale").exists()
    assert verify_pennfudan(root) == root


def test_download_rejects_bad_zip_and_short_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(pf, "_download", lambda url, dest, timeout: dest.write_bytes(b"<html>"))
    dest = tmp_path / "cache"
    with pytest.raises(DetfitError) as info:
        download_pennfudan(dest, urls=URLS[:1])
    assert f"PennFudanPed.zip from {URLS[0]}: not a valid zip" in str(info.value)
    assert list(dest.iterdir()) == []

    short = _full_size_zip(tmp_path / "short.zip", num_images=169)
    monkeypatch.setattr(pf, "_download", lambda url, dest, timeout: shutil.copyfile(short, dest))
    with pytest.raises(DetfitError, match="expected 170 images .* found 169 images"):
        download_pennfudan(dest, urls=URLS[:1])
    assert list(dest.iterdir()) == []


def test_ssl_context_uses_certifi(monkeypatch):
    captured = {}
    real = ssl.create_default_context

    def spy(*args, **kwargs):
        captured.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", spy)
    context = pf._ssl_context()
    assert isinstance(context, ssl.SSLContext)
    assert captured == {"cafile": certifi.where()}
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_download_passes_ssl_context_and_timeout(tmp_path, monkeypatch):
    seen = {}

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(request, context, timeout):
        seen.update(url=request.full_url, agent=request.get_header("User-agent"))
        seen.update(context=context, timeout=timeout)
        return Response(b"zip bytes")

    monkeypatch.setattr(pf.urllib.request, "urlopen", fake_urlopen)
    out = tmp_path / "f.zip"
    pf._download(URLS[0], out, timeout=12.5)
    assert out.read_bytes() == b"zip bytes"
    assert seen["url"] == URLS[0]
    assert seen["agent"] == "detfit"
    assert seen["timeout"] == 12.5
    assert isinstance(seen["context"], ssl.SSLContext)


# --- resolve ----------------------------------------------------------------------------------


def test_resolve_without_data_or_download(tmp_path, monkeypatch):
    monkeypatch.setenv("DETFIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(pf, "_download", lambda *a: pytest.fail("must not download"))
    with pytest.raises(DetfitError) as info:
        resolve_pennfudan(data_root=None, download=False)
    assert "--data-root" in str(info.value)
    assert str(tmp_path / "home" / "data" / "PennFudanPed") in str(info.value)


def test_resolve_prefers_data_root_then_cache(tmp_path, monkeypatch, synthetic_root):
    monkeypatch.setenv("DETFIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(pf, "_download", lambda *a: pytest.fail("must not download"))
    with zipfile.ZipFile(_full_size_zip(tmp_path / "p.zip")) as zf:
        zf.extractall(tmp_path / "mine")
    assert resolve_pennfudan(tmp_path / "mine") == tmp_path / "mine" / "PennFudanPed"
    # an explicit root may hold any number of pairs, but each image needs its mask
    assert resolve_pennfudan(synthetic_root.parent) == synthetic_root
    broken = shutil.copytree(synthetic_root, tmp_path / "broken" / "PennFudanPed")
    (broken / "PedMasks" / "FudanPed00001_mask.png").unlink()
    with pytest.raises(DetfitError, match="unmatched: FudanPed00001"):
        resolve_pennfudan(broken)

    # the cache is the official archive: it must hold all 170
    cached = tmp_path / "home" / "data" / "PennFudanPed"
    shutil.copytree(synthetic_root, cached)
    with pytest.raises(DetfitError, match="expected 170 images"):
        resolve_pennfudan(download=False)
    shutil.rmtree(cached)
    shutil.copytree(tmp_path / "mine" / "PennFudanPed", cached)
    assert resolve_pennfudan(download=False) == cached


# --- summary ----------------------------------------------------------------------------------


def test_summarize_synthetic(synthetic_root):
    masks = sorted((synthetic_root / "PedMasks").glob("*.png"))
    per_image = [len(_instance_ids(p)) for p in masks]
    sizes = [Image.open(p).size for p in sorted((synthetic_root / "PNGImages").glob("*.png"))]
    widths, heights = zip(*sizes, strict=True)

    summary = summarize_pennfudan(synthetic_root)
    assert summary["images"] == 8
    assert summary["instances"] == sum(per_image)
    assert summary["instances per image"] == (
        f"min {min(per_image)}, mean {sum(per_image) / 8:.2f}, max {max(per_image)}"
    )
    assert summary["height"] == f"{min(heights)}-{max(heights)} px"
    assert summary["width"] == f"{min(widths)}-{max(widths)} px"
    assert summary["classes"] == "person"


# --- the real data set ------------------------------------------------------------------------

BOX_LINE = re.compile(
    r'Bounding box for object (\d+) "[^"]*" \(Xmin, Ymin\) - \(Xmax, Ymax\) : '
    r"\((\d+), (\d+)\) - \((\d+), (\d+)\)"
)


@pytest.mark.slow
def test_real_pennfudan(real_root):
    assert verify_pennfudan(real_root) == real_root
    ds = PennFudanDataset(real_root)
    assert len(ds) == 170
    total = 0
    off_by_more = set()
    for idx, mask_path in enumerate(ds.masks):
        stem = ds.imgs[idx].stem
        assert mask_path.name == f"{stem}_mask.png"
        text = (real_root / "Annotation" / f"{stem}.txt").read_text()
        size = re.search(r"Image size \(X x Y x C\) : (\d+) x (\d+) x 3", text)
        assert ds.get_height_and_width(idx) == (int(size[2]), int(size[1]))

        _, target = ds[idx]
        boxes = target["boxes"].as_subclass(torch.Tensor)
        total += len(boxes)
        objects = {int(m[1]): [int(v) - 1 for v in m.groups()[1:]] for m in BOX_LINE.finditer(text)}
        # every annotated object K is instance id K of the mask, and the mask has no others
        assert sorted(objects) == list(range(1, len(boxes) + 1)), stem
        for k, annotated in objects.items():
            # annotation is 1-based and inclusive: minus 1 it is masks_to_boxes' pixel indices
            diff = (boxes[k - 1] - torch.tensor(annotated, dtype=torch.float32)).abs().max()
            if diff > 2:
                off_by_more.add((stem, k))
    assert total == 423
    # the annotators' box reaches further right than the mask in these two (occluded) cases
    assert off_by_more == {("PennPed00019", 6), ("PennPed00027", 1)}
