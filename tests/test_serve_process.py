"""A real ``detfit serve`` process on 127.0.0.1: 200 requests at concurrency 8 with no error
and no memory growth, and SIGTERM that lets a request in flight finish before exiting 0."""

from __future__ import annotations

import asyncio
import signal
import threading

import httpx
import psutil
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from servekit import serve_process, tiny_models  # noqa: F401  (the fixture "tiny")

REQUESTS, CONCURRENCY, WARM_UP = 200, 8, 50
# A leak of what one request holds (its decoded image, its [N,H,W] masks: ~10 MB for the
# 320x240 image at 30 detections) over the 150 requests after warm-up would be hundreds of MB.
RSS_GROWTH_LIMIT = 64 * 2**20


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_200_requests_at_concurrency_8_without_error_or_memory_growth(tiny, tmp_path):
    images = [*tiny["images"], tiny["photo"]]
    bodies = [p.read_bytes() for p in images]
    sizes = [Image.open(p).size for p in images]
    with serve_process(tiny["checkpoint"], "--threads", "1", log=tmp_path / "log") as (proc, url):
        server = psutil.Process(proc.pid)
        failures: list[str] = []

        async def load(first: int, count: int) -> None:
            queue = iter(range(first, first + count))
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:

                async def worker() -> None:
                    for n in queue:
                        k = n % len(images)
                        r = await client.post("/v1/predict", content=bodies[k])
                        doc = r.json() if r.status_code == 200 else {}
                        if r.status_code != 200 or (doc["width"], doc["height"]) != sizes[k]:
                            failures.append(f"request {n}: {r.status_code} {r.text[:200]}")

                await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

        asyncio.run(load(0, WARM_UP))
        warm = server.memory_info().rss
        asyncio.run(load(WARM_UP, REQUESTS - WARM_UP))
        after = server.memory_info().rss
        assert failures == []
        assert metric(url, "detfit_requests_total", route="/v1/predict", status="200") == REQUESTS
        assert metric(url, "detfit_batch_size_sum") == REQUESTS
        assert after - warm < RSS_GROWTH_LIMIT, f"RSS grew {(after - warm) / 2**20:.0f} MiB"


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(tiny, tmp_path):
    # a request waits up to 3 s for others to batch with: it is in flight when SIGTERM comes
    flags = ("--threads", "1", "--max-batch", "64", "--max-wait-ms", "3000")
    with serve_process(tiny["checkpoint"], *flags, log=tmp_path / "log") as (proc, url):
        answer: dict = {}

        def send() -> None:
            r = httpx.post(f"{url}/v1/predict", content=tiny["images"][0].read_bytes(), timeout=60)
            answer.update(status=r.status_code, doc=r.json())

        client = threading.Thread(target=send)
        client.start()
        for _ in range(600):  # in flight: the predict request and this /metrics one
            if metric(url, "detfit_requests_in_flight") >= 2:
                break
        else:
            raise AssertionError("the request never arrived")
        proc.send_signal(signal.SIGTERM)
        client.join(60)
        assert proc.wait(60) == 0
        assert answer["status"] == 200 and answer["doc"]["detections"]
        assert "Waiting for connections to close" in (tmp_path / "log").read_text()
