"""``detfit serve``'s settings in one typed place: the command line fills them, the app and the
runner read them, and worker processes get them back from one environment variable (JSON)."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field, ValidationError

from detfit.errors import DetfitError
from detfit.predict.defaults import DEFAULT_OVERLAP, DEFAULT_SCORE_THRESHOLD

API_KEY_ENV = "DETFIT_API_KEY"  # the key without putting it on the command line (ps shows that)
SETTINGS_ENV = "DETFIT_SERVE_SETTINGS"  # how --workers N processes receive these settings


class ServeSettings(BaseModel):
    """What the server is and what it accepts; every limit has a safe default."""

    model: str = Field(description="Run folder, .pt checkpoint, TorchScript or .onnx file.")
    host: str = Field("127.0.0.1", description="Address to bind (127.0.0.1: this machine only).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N.")
    threads: int | None = Field(
        None, ge=1, description="Intra-op threads per worker (default: the cores / workers)."
    )
    workers: int = Field(1, ge=1, le=64, description="Processes, each with its own model copy.")
    max_batch: int = Field(4, ge=1, le=64, description="Requests per model call at most.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="How long a request waits for others to batch with."
    )
    max_bytes: int = Field(
        20 * 2**20, ge=1, description="Largest upload (bytes); larger is answered 413."
    )
    max_pixels: int = Field(
        40_000_000, ge=1, description="Largest image (width x height, from its header); 413."
    )
    api_key: str | None = Field(
        None, description=f"Key asked of every /v1 and /metrics request (or ${API_KEY_ENV})."
    )
    cors: list[str] = Field(
        default_factory=list, description="Origins allowed to call the API from a browser."
    )
    score_threshold: float = Field(
        DEFAULT_SCORE_THRESHOLD,
        ge=0,
        le=1,
        description="Score threshold of a request that names none.",
    )
    slice_size: int | None = Field(
        None, description="Predict on tiles of this many pixels (detfit.predict.slicing)."
    )
    slice_overlap: float = Field(
        DEFAULT_OVERLAP, description="With slice_size: share of a tile overlapping."
    )
    slice_full: bool = Field(True, description="With slice_size: also the whole image.")
    drain_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long requests in flight may take to finish."
    )

    @classmethod
    def parse(cls, **values) -> ServeSettings:
        """Settings from keyword values; an out-of-range value is one DetfitError line."""
        try:
            return cls(**values)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = "--" + "-".join(str(p).replace("_", "-") for p in error["loc"])
            raise DetfitError(f"{where}: {error['msg']}") from None

    def intra_op_threads(self, cores: int | None = None) -> int:
        """--threads, else the cores shared out among the workers (at least one each)."""
        if self.threads:
            return self.threads
        return max(1, (cores or os.cpu_count() or 1) // self.workers)
