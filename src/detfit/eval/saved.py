"""Score a saved checkpoint: what ``detfit eval`` runs, in one process or under torchrun."""

from __future__ import annotations

from pathlib import Path

from detfit import distributed
from detfit.errors import DetfitError
from detfit.eval.backends import check_backend
from detfit.eval.loop import EvaluationResult, evaluate


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    data_root: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    verbose: bool = True,
    backend: str | None = None,
) -> EvaluationResult:
    """COCO evaluation of ``checkpoint`` on its run's test split, or on ``data``, with the COCO
    metric ``backend`` (None: the run's ``eval_backend``).

    Under torchrun each rank scores its share of the images and rank 0 gathers them: the stats
    (on every rank) equal a single-process evaluation of the same weights.
    """
    from detfit.config import TrainConfig
    from detfit.engine.builders import build_datasets, build_loaders
    from detfit.engine.checkpoint import load_checkpoint
    from detfit.models import rebuild_model

    if backend is not None:
        check_backend(backend, "--backend")  # before the (slow) checkpoint is read
    ckpt = load_checkpoint(checkpoint)
    cfg = TrainConfig.from_dict(ckpt["config"], str(checkpoint))
    if data_root:
        cfg.data_root = str(data_root)
    if data:
        cfg.dataset = data
    if backend is not None:
        cfg.eval_backend = backend
    dev = distributed.resolve_device(device)
    with distributed.process_group(dev):
        with distributed.main_first():
            datasets = build_datasets(cfg, log=lambda line: None, held_out="test")
        classes = ckpt["model_info"].get("classes")
        if classes and datasets.classes != classes:
            raise DetfitError(
                f"{cfg.dataset}: classes {datasets.classes[1:]} differ from the checkpoint's "
                f"{classes[1:]}"
            )
        loaders = build_loaders(cfg, datasets, distributed.rank(), distributed.world_size())
        model = rebuild_model(ckpt["model_info"], ckpt["model"], str(checkpoint)).to(dev)
        return evaluate(
            model,
            loaders.test,
            dev,
            classes=datasets.classes,
            progress=progress,
            verbose=verbose and distributed.is_main(),
            backend=cfg.eval_backend,
        )
