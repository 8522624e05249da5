"""Seconds per image for eager torch, TorchScript and ONNX Runtime: the same model, the same
images, one process, side by side; and whether the exported outputs are the eager ones.

    python benchmarks/inference_speed.py --threads 2            # both models, 20 Penn-Fudan images
    python benchmarks/inference_speed.py --checkpoint maskrcnn_mobilenet_v2_fpn=runs/x/best.pt

With ``--int8`` a fourth runtime, onnx-int8, is the ONNX file statically quantized by
``detfit.export.quantize`` (calibrated on the same images; its parity is not expected).

Models: the CPU recipe's (``maskrcnn_mobilenet_v2_fpn`` with RECIPES["cpu"]'s model_options) and
``fasterrcnn_mobilenet_v3_large_320_fpn``. Without ``--checkpoint`` a model has random weights
(heads He-initialised so scores differ): Mask R-CNN then pastes a mask for every one of its
detections, so give a trained checkpoint to time what users run. Each runtime gets ``--threads``
threads, one warm-up image, then ``--repeat`` timed passes over the images; the median pass is
reported. Exports are written to a temporary folder without the export-time check (the parity
column here is the check, on these images).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

MODELS = ["maskrcnn_mobilenet_v2_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"]
RUNTIMES = ["eager", "torchscript", "onnx"]


def model_checkpoint(name: str, folder: Path, options: dict) -> Path:
    """A checkpoint of ``name`` with random, spread-out weights (no pretrained file needed)."""
    import torch
    from torch import nn

    from detfit.checkpoint import model_info
    from detfit.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 2, weights=None, weights_backbone=None, **options).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)) and not module_name.startswith(
                "backbone"
            ):
                module.weight.normal_(std=(2.0 / module.weight[0].numel()) ** 0.5, generator=gen)
    info = model_info(name, 2, ["__background__", "person"], options, model)
    path = folder / f"{name}.pt"
    torch.save({"model": model.state_dict(), "model_info": info, "config": {}}, path)
    return path


def load_images(spec: str | None, count: int) -> list:
    from detfit.data.images import IMAGE_SUFFIXES, load_rgb
    from detfit.data.pennfudan import resolve_pennfudan

    folder = Path(spec) if spec else resolve_pennfudan(None, download=False) / "PNGImages"
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not paths:
        sys.exit(f"{folder}: no images")
    return [load_rgb(p).float() / 255.0 for p in paths]


def time_runtime(backend, images: list, repeat: int) -> float:
    backend(images[:1])  # warm-up: first-call allocations, ORT graph optimisation
    passes = []
    for _ in range(repeat):
        start = time.perf_counter()
        for image in images:
            backend([image])
        passes.append((time.perf_counter() - start) / len(images))
    return statistics.median(passes)


def torch_profile(backend, images: list, top: int) -> list[tuple[str, float]]:
    """(operator, seconds per image) of one pass under torch.profiler, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    backend(images[:1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for image in images:
            backend([image])
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / 1e6 / len(images)) for e in ops[:top]]


def onnx_profile(path: Path, images: list, threads: int, top: int) -> list[tuple[str, float]]:
    """(ONNX operator type, seconds per image) of one pass under ONNX Runtime's own profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))  # beside the export, in its tmp folder
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: images[0].numpy()})
    for image in images:
        session.run(None, {name: image.numpy()})
    trace_file = Path(session.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    totals: dict[str, float] = {}
    runs = [e for e in trace if e.get("name") == "model_run"]
    first_timed = runs[1]["ts"] if len(runs) > 1 else 0  # skip the warm-up run
    for event in trace:
        if event.get("cat") == "Node" and event["ts"] >= first_timed:
            op = event.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1e6 / len(images)
    return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--images", help="folder of images (default: Penn-Fudan's PNGImages)")
    parser.add_argument("--count", type=int, default=20, help="number of images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--checkpoint", action="append", default=[], help="MODEL=CKPT")
    parser.add_argument("--set", action="append", default=[], help="model option KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also onnx-int8: the ONNX file statically quantized (calibrated on these images)",
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print each runtime's top N operators"
    )
    args = parser.parse_args()

    import torch
    import yaml

    from detfit.config import RECIPES
    from detfit.export import export_model
    from detfit.export.parity import compare
    from detfit.predict.backends import load_backend

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    images = load_images(args.images, args.count)
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    given = dict(c.split("=", 1) for c in args.checkpoint)
    sizes = sorted({tuple(im.shape[-2:]) for im in images})
    print(
        f"{len(images)} images ({len(sizes)} sizes), {args.threads} threads, torch "
        f"{torch.__version__}, median of {args.repeat} passes"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            options = (
                dict(RECIPES["cpu"]["model_options"]) if name == RECIPES["cpu"]["model"] else {}
            )
            options.update(extra)
            ckpt = (
                Path(given[name]) if name in given else model_checkpoint(name, Path(tmp), options)
            )
            files = {"eager": ckpt}
            for fmt in ("torchscript", "onnx"):
                files[fmt], _ = export_model(
                    ckpt,
                    fmt,
                    Path(tmp) / f"{name}.{fmt}",
                    images=[],
                    check=False,
                    log=lambda s: None,
                )
            if args.int8:
                from detfit.export.quantize import quantize_int8

                files["onnx-int8"] = Path(tmp) / f"{name}.int8.onnx"
                quantize_int8(files["onnx"], files["onnx-int8"], images)
            backends = {k: load_backend(v, "cpu", threads=args.threads) for k, v in files.items()}
            row = {"model": name, "weights": "checkpoint" if name in given else "random"}
            eager_out = [backends["eager"]([im])[0] for im in images]
            for runtime, backend in backends.items():
                row[f"{runtime}_s_per_image"] = time_runtime(backend, images, args.repeat)
                if runtime != "eager":
                    checks = [
                        compare(str(i), tuple(im.shape[-2:]), eager_out[i], backend([im])[0])
                        for i, im in enumerate(images)
                    ]
                    row[f"{runtime}_parity"] = f"{sum(c.ok for c in checks)}/{len(checks)}"
            row["detections_per_image"] = sum(len(o["boxes"]) for o in eager_out) / len(images)
            if args.profile:
                row["profile"] = {
                    "eager": torch_profile(backends["eager"], images, args.profile),
                    "torchscript": torch_profile(backends["torchscript"], images, args.profile),
                    "onnx": onnx_profile(files["onnx"], images, args.threads, args.profile),
                }
            rows.append(row)
    print(f"\n{'model':40s} {'runtime':12s} {'s/image':>8s} {'vs eager':>8s} {'parity':>7s}")
    runtimes = RUNTIMES + ["onnx-int8"] if args.int8 else RUNTIMES
    for row in rows:
        eager = row["eager_s_per_image"]
        for runtime in runtimes:
            s = row[f"{runtime}_s_per_image"]
            parity = row.get(f"{runtime}_parity", "-")
            print(f"{row['model']:40s} {runtime:12s} {s:8.3f} {eager / s:7.2f}x {parity:>7s}")
        print(
            f"{'':40s} ({row['weights']} weights, {row['detections_per_image']:.1f} "
            f"detections/image)"
        )
    for row in rows:
        for runtime, ops in row.get("profile", {}).items():
            total = row[f"{runtime}_s_per_image"]
            print(
                f"\n{row['model']} {runtime}: top operators, ms per image (share of {total:.3f} s)"
            )
            for op, sec in ops:
                print(f"  {op:45s} {1000 * sec:8.1f}  {100 * sec / total:5.1f}%")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
