"""Requests per second and latency (p50, p95) of ``detfit serve`` at concurrency 1, 4 and 8,
for eager torch and ONNX Runtime, against ``detfit predict``'s own time per image on the same
images and model: the server's overhead per image is its p50 at concurrency 1 over predict's.

    python benchmarks/serve_speed.py --threads 2                 # 8 Penn-Fudan images
    python benchmarks/serve_speed.py --checkpoint runs/x/best.pt --images photos/ --count 16

The model is the CPU recipe's (``maskrcnn_mobilenet_v2_fpn``) with random, spread-out weights
unless ``--checkpoint`` is given; the ONNX file is exported from it (no export check). Each
server is a real ``detfit serve`` process on 127.0.0.1 with ``--threads`` threads; after one
warm-up pass, each level of concurrency sends ``--passes`` passes over the images. ``detfit
predict`` runs in this process on the same backend and threads, one image per model call:
whole (decode, model, JSON and overlay PNG written) and JSON only (decode, model, JSON
document: what a request computes). At concurrency 1 each request follows ``detfit predict``
on the same image, so that on a shared machine both see the same load; the overhead is the
median of these paired ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class InProcess:
    """``detfit predict`` in this process on the same backend and threads, one image per model
    call: ``whole`` (decode, model, JSON and overlay PNG written, predict_inputs) and ``json``
    (what a request to the server computes: decode, model, JSON document)."""

    def __init__(self, model: Path, threads: int, out: Path) -> None:
        import torch

        from detfit.predict import Predictor

        torch.set_num_threads(threads)
        self.predictor, self.out = Predictor(model, "cpu", threads=threads), out
        # The server calls the model from a worker thread; so does this. On this machine a
        # CPU-recipe model called from the main thread of a fresh process ran 3-6x slower (4-7 s
        # an image) until it had run once on another thread, then fast on both.
        self.thread = ThreadPoolExecutor(1)

    def whole(self, path: Path) -> float:
        return self.thread.submit(self._whole, path).result()

    def json(self, path: Path) -> float:
        return self.thread.submit(self._json, path).result()

    def _whole(self, path: Path) -> float:
        from detfit.predict import predict_inputs

        started = time.perf_counter()
        predict_inputs(self.predictor, [path], self.out, batch_size=1, progress=False, log=print)
        return time.perf_counter() - started

    def _json(self, path: Path) -> float:
        from detfit.predict.run import record
        from detfit.serve.uploads import check_header, decode

        started = time.perf_counter()
        data = path.read_bytes()
        image = decode(data, check_header(data, 10**9))
        json.dumps({"detections": record(self.predictor.predict([image])[0])})
        return time.perf_counter() - started


def start_server(model: Path, threads: int, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "detfit", "serve", str(model), "--port", str(port)]
    command += ["--threads", str(threads), "--device", "cpu"]
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
        if process.poll() is not None:
            break
    sys.exit(f"detfit serve did not start: {log.read_text()[-2000:]}")


def paired(url: str, local: InProcess, images: list[Path], passes: int) -> dict[str, float]:
    """Concurrency 1, each request right after ``detfit predict`` on the same image, so that
    both see the same load on a shared machine; medians of the three times per image."""
    times: dict[str, list[float]] = {"predict": [], "predict_json": [], "server": []}
    with httpx.Client(base_url=url, timeout=300) as client:
        # warm-up on every image: torch's CPU kernels are prepared for each new input size,
        # which makes the first pass over a set of images several times slower than the next
        for path in images:
            local.whole(path)
            client.post("/v1/predict", content=path.read_bytes()).raise_for_status()
        started = time.perf_counter()
        for _ in range(passes):
            for path in images:
                times["predict"].append(local.whole(path))
                times["predict_json"].append(local.json(path))
                body = path.read_bytes()
                t0 = time.perf_counter()
                client.post("/v1/predict", content=body).raise_for_status()
                times["server"].append(time.perf_counter() - t0)
        wall = time.perf_counter() - started
    ratios = [s / p for s, p in zip(times["server"], times["predict_json"])]
    return {
        "predict_s": statistics.median(times["predict"]),
        "predict_json_s": statistics.median(times["predict_json"]),
        "c1": {
            "requests": len(times["server"]),
            "req_per_s": len(times["server"]) / sum(times["server"]),
            "p50_s": statistics.median(times["server"]),
            "p95_s": percentile(times["server"], 0.95),
        },
        "overhead_c1": statistics.median(ratios) - 1,
        "paired_wall_s": wall,
    }


async def measure(url: str, bodies: list[bytes], concurrency: int, passes: int) -> dict:
    jobs = iter([b for _ in range(passes) for b in bodies])
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def worker() -> None:
            for body in jobs:
                started = time.perf_counter()
                r = await client.post("/v1/predict", content=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "req_per_s": len(latencies) / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 0.95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="A trained checkpoint (default: random weights).")
    parser.add_argument("--images", help="Folder of images (default: Penn-Fudan's PNGImages).")
    parser.add_argument("--count", type=int, default=8, help="How many images.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=2, help="Passes over the images per level.")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--json", help="Also write the results here.")
    args = parser.parse_args()

    from inference_speed import model_checkpoint

    from detfit.config import RECIPES
    from detfit.data.images import IMAGE_SUFFIXES
    from detfit.data.pennfudan import resolve_pennfudan

    folder = Path(args.images) if args.images else resolve_pennfudan(None, False) / "PNGImages"
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    images = images[: args.count]
    bodies = [p.read_bytes() for p in images]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cpu = RECIPES["cpu"]
        checkpoint = (
            Path(args.checkpoint)
            if args.checkpoint
            else model_checkpoint(cpu["model"], tmp, dict(cpu["model_options"]))
        )
        # exported by detfit's command in its own process: tracing the model here would change
        # how torch runs the eager model afterwards in this process
        onnx = tmp / "model.onnx"
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        export = [sys.executable, "-m", "detfit", "export", str(checkpoint), "--format", "onnx"]
        subprocess.run([*export, "--out", str(onnx), "--no-check"], check=True, env=env)
        for runtime, model in (("eager", checkpoint), ("onnx", onnx)):
            local = InProcess(model, args.threads, tmp / f"predict-{runtime}")
            server = start_server(model, args.threads, args.port, tmp / f"{runtime}.log")
            url = f"http://127.0.0.1:{args.port}"
            try:
                row = paired(url, local, images, args.passes)
                for concurrency in (4, 8):
                    row[f"c{concurrency}"] = asyncio.run(
                        measure(url, bodies, concurrency, args.passes)
                    )
            finally:
                server.terminate()
                server.wait(60)
            del local
            results[runtime] = row
            print(runtime, json.dumps(row), flush=True)
    print_table(results, len(images), args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(results: dict[str, dict], count: int, threads: int) -> None:
    print(f"\n{count} images, {threads} threads")
    print(
        "| runtime | predict s/img | predict (JSON only) s/img | concurrency | req/s | p50 s | p95 s |"
    )
    print("|---|---|---|---|---|---|---|")
    for runtime, row in results.items():
        for c in (1, 4, 8):
            m = row[f"c{c}"]
            head = f"{row['predict_s']:.3f} | {row['predict_json_s']:.3f}" if c == 1 else " | "
            print(
                f"| {runtime} | {head} | {c} | {m['req_per_s']:.2f} | {m['p50_s']:.3f} | {m['p95_s']:.3f} |"
            )
        print(
            f"| {runtime} | server overhead at concurrency 1 (median of paired ratios - 1) | "
            f"**{100 * row['overhead_c1']:+.1f}%** | | | | |"
        )


if __name__ == "__main__":
    main()
