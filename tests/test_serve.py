"""``detfit serve``'s API in-process: results equal to ``detfit predict`` for every model kind,
batching that keeps each result with its request, every refusal as one JSON line with its HTTP
code, the API key, CORS, metrics, the page's files, and the command line's one-line errors."""

from __future__ import annotations

import asyncio
import io
import json
import random
import struct
import sys
import zlib

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import run_main
from detfit.serve.app import STATIC, create_app, load_predictor
from detfit.serve.batching import Batcher
from detfit.serve.settings import ServeSettings
from servekit import served_models  # noqa: F401  (the fixture "served")

KINDS = ["checkpoint", "run", "torchscript", "onnx"]


def settings(model, **values) -> ServeSettings:
    return ServeSettings(model=str(model), threads=1, **values)


@pytest.fixture(scope="module")
def client(served):
    """A client of the checkpoint's app, with small limits the error tests reach."""
    app = create_app(settings(served["checkpoint"], max_bytes=60_000, max_pixels=200_000))
    with TestClient(app) as c:
        yield c


def predicted(monkeypatch, capsys, model, images, out, *flags) -> dict[str, dict]:
    """``detfit predict``'s JSON documents by image name, and its PNG bytes."""
    code, stdout, err = run_main(
        monkeypatch, capsys, "predict", model, *images, "--out", out, "--quiet", *flags
    )
    assert code in (None, 0), err
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize("kind", KINDS)
def test_results_equal_detfit_predict(served, kind, tmp_path, monkeypatch, capsys):
    model, images = served[kind], served["images"]
    expected = predicted(
        monkeypatch,
        capsys,
        model,
        images,
        tmp_path,
        "--score-threshold",
        "0.3",
        "--batch-size",
        "1",
    )
    with TestClient(create_app(settings(model))) as c:
        card = c.get("/v1/model").json()
        assert card["kind"] == ("checkpoint" if kind == "run" else kind)
        assert card["backend"] == ("onnxruntime" if kind == "onnx" else "torch")
        assert card["classes"] == ["cat", "dog"] and card["category_ids"] == [17, 18]
        assert card["input_size"] == {"min_size": 64, "max_size": 96}
        assert card["outputs"] == ["bbox", "segm"]
        for k, path in enumerate(images):
            data = path.read_bytes()
            if k % 2:  # multipart upload and raw body both
                r = c.post("/v1/predict?score_threshold=0.3", files={"image": (path.name, data)})
                assert r.json()["image"] == path.name
            else:
                r = c.post("/v1/predict", params={"score_threshold": 0.3}, content=data)
                assert r.json()["image"] == "upload"
            assert r.status_code == 200
            want = expected[path.stem]
            assert want["detections"], "the tiny model finds something on every image"
            assert {**r.json(), "image": want["image"]} == want
            overlay = c.post("/v1/predict?score_threshold=0.3&format=png", content=data)
            assert overlay.headers["content-type"] == "image/png"
            assert np.array_equal(
                png_pixels(overlay.content),
                png_pixels((tmp_path / f"{path.stem}.png").read_bytes()),
            )
        if kind == "checkpoint":  # the class filter, by name and by category id
            only_dog = predicted(
                monkeypatch, capsys, model, images, tmp_path / "dog", "--score-threshold", "0",
                "--batch-size", "1", "--classes", "dog",
            )  # fmt: skip
            for path in images:
                for query in ("classes=dog", "classes=18", "classes=dog,18"):
                    r = c.post(f"/v1/predict?score_threshold=0&{query}", content=path.read_bytes())
                    assert r.json()["detections"] == only_dog[path.stem]["detections"], query
            found = {d["class"] for doc in only_dog.values() for d in doc["detections"]}
            assert found == {"dog"}


def test_concurrent_requests_get_their_own_results(served):
    """Sixteen requests of four images at once, batched: each answer is its own image's.

    The images share one size: a batch pads its images to the largest, and padding moves a
    random model's near-tied scores enough to reorder them; at one size what differs is the
    order of float operations."""
    images = served["twins"]
    app = create_app(settings(served["checkpoint"], max_batch=4, max_wait_ms=200))
    alone = {}
    order = [k for k in range(len(images)) for _ in range(4)]
    random.Random(0).shuffle(order)

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://serve") as c:
                for k, path in enumerate(images):
                    r = await c.post("/v1/predict?score_threshold=0", content=path.read_bytes())
                    alone[k] = r.json()

                async def one(k):
                    r = await c.post(
                        "/v1/predict?score_threshold=0", content=images[k].read_bytes()
                    )
                    return k, r.status_code, r.json()

                return await asyncio.gather(*(one(k) for k in order))

    answers = asyncio.run(scenario())
    for k, status, doc in answers:
        assert status == 200
        # float noise may still swap a near-tie at the 30-detection cut: nearly all, not all
        assert matched(doc["detections"], alone[k]["detections"]) >= 0.8
        for j in alone.keys() - {k}:  # far fewer are another image's
            assert matched(doc["detections"], alone[j]["detections"]) < 0.5
    batches = app.state.metrics.batch_size.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    total = next(s.value for s in batches if s.name.endswith("_sum"))
    assert total == len(images) + len(order)  # every image ran once
    assert count < total  # and some shared a model call


def test_batcher_hands_each_result_to_its_own_request():
    """Forty submissions at random moments: each gets its own result, batches never exceed
    max_batch, and an item the model fails on fails alone."""
    calls = []

    def run(items):
        calls.append(len(items))
        if 13 in items:
            raise ValueError("thirteen")
        return [f"result of {x}" for x in items]

    async def scenario():
        batcher = Batcher(run, max_batch=4, max_wait_s=0.02)
        batcher.start()
        delays = random.Random(1)

        async def one(x):
            await asyncio.sleep(delays.uniform(0, 0.05))
            try:
                return x, await batcher.submit(x)
            except ValueError as exc:
                return x, str(exc)

        answers = await asyncio.gather(*(one(x) for x in range(40)))
        await batcher.stop()
        return answers

    for x, answer in asyncio.run(scenario()):
        assert answer == ("thirteen" if x == 13 else f"result of {x}")
    assert max(calls) == 4 and len(calls) < 40


def matched(mine: list[dict], theirs: list[dict]) -> float:
    """The share of ``mine`` found in ``theirs``: same class, score and box to float precision."""
    assert mine

    def same(a: dict, b: dict) -> bool:
        return (
            a["class"] == b["class"]
            and abs(a["score"] - b["score"]) < 1e-4
            and np.allclose(a["box_xyxy"], b["box_xyxy"], atol=0.02)
        )

    return sum(any(same(a, b) for b in theirs) for a in mine) / len(mine)


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height whose pixel data is a few bytes: what a decompression bomb
    looks like before decoding, without the memory that decoding it would take."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def one_line_error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert (
        list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in body["error"]
    )
    assert words in body["error"], body["error"]


def test_every_refusal_is_one_json_line_and_the_server_keeps_serving(client, served, monkeypatch):
    import detfit.serve.uploads as uploads

    image = served["images"][0].read_bytes()  # 90x70
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 150, 3), np.uint8)).save(
        big, "PNG"
    )
    assert len(big.getvalue()) > 60_000  # over the client's max_bytes
    decoded = []
    real_load = uploads.load_rgb
    monkeypatch.setattr(uploads, "load_rgb", lambda path: decoded.append(1) or real_load(path))
    cases = [
        (dict(content=big.getvalue()), 413, "limit is 60000 bytes"),
        (dict(files={"image": ("big.png", big.getvalue())}), 413, "limit is 60000 bytes"),
        (dict(content=png_header(1000, 1000)), 413, "1000x1000 = 1000000 pixels"),
        (dict(content=png_header(30000, 30000)), 413, "image too large"),  # PIL's own bomb check
        (dict(content=b"hello, not an image"), 415, "not an image"),
        (dict(files={"image": ("notes.txt", b"plain text", "text/plain")}), 415, "not an image"),
        (dict(content=b""), 400, "empty request body"),
        (dict(content=image[: len(image) // 2]), 400, "does not decode"),
        (dict(files={"caption": (None, "just a field")}), 400, "without a file"),
        (
            dict(content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}),
            400,
            "malformed multipart",
        ),
        (dict(data={"image": "text"}), 415, "not an image"),  # a form of text fields
    ]
    for request, status, words in cases:
        one_line_error(client.post("/v1/predict", **request), status, words)
    assert len(decoded) == 1  # only the truncated image got as far as decoding
    queries = [
        ("score_threshold=abc", "score_threshold"),
        ("score_threshold=1.5", "less than or equal to 1"),
        ("format=gif", "format"),
        ("classes=bird", "classes bird: not a class of this model (cat, dog)"),
    ]
    for query, words in queries:
        one_line_error(client.post(f"/v1/predict?{query}", content=image), 400, words)
    one_line_error(client.get("/v1/nothing"), 404, "GET /v1/nothing")
    one_line_error(client.get("/v1/predict"), 405, "GET /v1/predict")
    one_line_error(
        client.post("/v1/predict", content=image, headers={"content-length": "99999999"}),
        413,
        "99999999 bytes",
    )
    assert client.post("/v1/predict", content=image).status_code == 200  # still serving


def test_a_failing_model_is_a_500_line_not_a_traceback(served, monkeypatch):
    predictor = load_predictor(settings(served["checkpoint"]))
    with TestClient(create_app(settings(served["checkpoint"]), predictor)) as c:
        image = served["images"][0].read_bytes()
        real = predictor.predict
        monkeypatch.setattr(predictor, "predict", lambda images: 1 / 0)
        one_line_error(c.post("/v1/predict", content=image), 500, "ZeroDivisionError")
        monkeypatch.setattr(predictor, "predict", real)
        assert c.post("/v1/predict", content=image).status_code == 200


def test_api_key_and_cors(served, monkeypatch):
    import detfit.serve.app as app_module

    compared = []
    real = app_module.hmac.compare_digest
    monkeypatch.setattr(
        app_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b)
    )
    origin = "http://localhost:5173"
    app = create_app(settings(served["checkpoint"], api_key="s3cret-key", cors=[origin]))
    with TestClient(app) as c:
        one_line_error(c.get("/v1/model"), 401, "API key")
        one_line_error(c.get("/v1/model", headers={"x-api-key": "s3cret-kez"}), 401, "API key")
        one_line_error(c.get("/metrics"), 401, "API key")
        one_line_error(c.post("/v1/predict", content=b"x"), 401, "API key")
        assert c.get("/v1/model", headers={"x-api-key": "s3cret-key"}).status_code == 200
        assert c.get("/v1/model", headers={"authorization": "Bearer s3cret-key"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        assert len(compared) == 6
        preflight = {"origin": origin, "access-control-request-method": "POST"}
        r = c.options("/v1/predict", headers=preflight)
        assert r.headers["access-control-allow-origin"] == origin
        r = c.options("/v1/predict", headers={**preflight, "origin": "http://elsewhere.test"})
        assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(settings(served["checkpoint"]))) as c:  # CORS off by default
        r = c.get("/v1/model", headers={"origin": origin})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        r = c.options("/v1/predict", headers=preflight)
        assert "access-control-allow-origin" not in r.headers


def test_health_metrics_and_the_page(client, served):
    assert client.get("/health").json() == {"status": "ok"}
    before = counts(client)
    image = served["images"][1].read_bytes()
    for _ in range(3):
        assert client.post("/v1/predict", content=image).status_code == 200
    client.post("/v1/predict", content=b"nope")
    after = counts(client)
    assert after[("/v1/predict", "200")] - before.get(("/v1/predict", "200"), 0) == 3
    assert after[("/v1/predict", "415")] - before.get(("/v1/predict", "415"), 0) == 1
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    latency = families["detfit_request_seconds"].samples
    predicts = [
        s for s in latency if s.name.endswith("_count") and s.labels["route"] == "/v1/predict"
    ]
    assert predicts[0].value == sum(v for (route, _), v in after.items() if route == "/v1/predict")
    assert "detfit_batch_size" in families and "detfit_model_seconds" in families

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text  # offline: nothing from elsewhere
        if name != "index.html":
            assert client.get(f"/static/{name}").text == text
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN


def counts(client) -> dict[tuple[str, str], float]:
    text = client.get("/metrics").text
    return {
        (s.labels["route"], s.labels["status"]): s.value
        for f in text_string_to_metric_families(text)
        if f.name == "detfit_requests"
        for s in f.samples
        if s.name == "detfit_requests_total"
    }


def test_cli_errors_are_one_line(served, monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "serve", tmp_path / "missing.pt")
    assert code == 2 and err == f"detfit: error: {tmp_path / 'missing.pt'}: model file not found\n"
    code, _, err = run_main(monkeypatch, capsys, "serve", served["checkpoint"], "--max-batch", "0")
    assert (
        code == 2
        and err == "detfit: error: --max-batch: Input should be greater than or equal to 1\n"
    )
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were not installed
    code, _, err = run_main(monkeypatch, capsys, "serve", served["checkpoint"])
    assert code == 2
    assert err == (
        "detfit: error: detfit serve needs the serve extra (fastapi is missing): "
        "pip install 'detfit[serve]'\n"
    )


def test_threads_are_shared_out_among_workers():
    assert ServeSettings(model="m").intra_op_threads(cores=2) == 2
    assert ServeSettings(model="m", workers=2).intra_op_threads(cores=2) == 1
    assert ServeSettings(model="m", workers=4).intra_op_threads(cores=2) == 1
    assert ServeSettings(model="m", workers=2, threads=3).intra_op_threads(cores=2) == 3
    assert ServeSettings(model="m").host == "127.0.0.1"


def test_sliced_serving_equals_predict_slice(served, tmp_path, monkeypatch, capsys):
    """--slice on the server: each image predicted on tiles, as `detfit predict --slice` does;
    an image smaller than a tile in both directions is a 400 line, and the server goes on."""
    image = served["photo"]  # 320 x 240
    expected = predicted(
        monkeypatch, capsys, served["checkpoint"], [image], tmp_path / "p", "--slice", "128",
        "--score-threshold", "0.5", "--batch-size", "1",
    )[image.stem]  # fmt: skip
    app = create_app(settings(served["checkpoint"], slice_size=128))
    with TestClient(app) as c:
        card = c.get("/v1/model").json()
        assert card["slicing"] == {"size": 128, "overlap": 0.2, "full": True}
        got = c.post("/v1/predict", content=image.read_bytes(), params={"score_threshold": 0.5})
        assert got.status_code == 200, got.text
        assert got.json()["detections"] == expected["detections"]
        assert len(expected["detections"]) > 0
        small = served["images"][0]  # smaller than a 128 px tile both ways
        refused = c.post("/v1/predict", content=small.read_bytes())
        assert refused.status_code == 400
        assert "--slice 128 is larger than the image" in refused.json()["error"]
        assert c.post("/v1/predict", content=image.read_bytes()).status_code == 200
