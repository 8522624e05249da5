"""TensorBoard logging (``logger: tensorboard``): ``tensorboard --logdir RUN/tensorboard``.

Per step: each loss and the lr (``train/...``). Per epoch: the 12 COCO numbers per IoU type
(``bbox/AP``, ...), per-class AP (``bbox_AP_per_class/<class>``), validation losses when computed
(``val/...``) and a few test images, ground truth beside the predictions scoring at least the
best-F1 score (``predictions/...``). Every
point is at the global step, so the epoch values line up with the step curves. Rank 0 writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from detfit.engine.callbacks import Callback
from detfit.errors import DetfitError

if TYPE_CHECKING:
    from detfit.engine.step import StepResult
    from detfit.engine.trainer import Trainer

IMAGES_PER_EPOCH = 4
LOG_DIR = "tensorboard"


def summary_writer_class() -> type:
    """torch's SummaryWriter, or a one-line error naming the extra that installs TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DetfitError(
            "logger: tensorboard needs the tensorboard package: pip install 'detfit[tensorboard]'"
        ) from None
    return SummaryWriter


class TensorBoardLogger(Callback):
    """Scalars and images for TensorBoard under ``RUN/tensorboard``. A resumed run drops the
    events logged after its checkpoint's step, so no curve doubles back."""

    main_process_only = True

    def __init__(self) -> None:
        self.writer_class = summary_writer_class()  # fails before any folder is made
        self.writer: Any = None

    def on_train_start(self, trainer: Trainer) -> None:
        # the checkpoint was saved before this callback logged its step: keep that step's points
        purge = trainer.global_step + 1 if trainer.checkpoint is not None else None
        self.writer = self.writer_class(str(trainer.run_dir / LOG_DIR), purge_step=purge)

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if result.skipped:
            return
        step = trainer.global_step
        self.writer.add_scalar("train/loss", result.loss, step)
        for name, value in result.losses.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.add_scalar("train/lr", trainer.optimizer.param_groups[0]["lr"], step)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        from detfit.plots.gallery import samples_from_evaluation, side_by_side, spread_indices
        from detfit.plots.report import shown_threshold

        step, result = trainer.global_step, trainer.last_evaluation
        for iou_type, stats in result.stats.items():
            for name, value in stats.items():
                self.writer.add_scalar(f"{iou_type}/{name}", value, step)
        for iou_type, aps in result.per_class.items():
            for name, value in aps.items():
                self.writer.add_scalar(f"{iou_type}_AP_per_class/{name}", value, step)
        for key, value in trainer.extra_metrics.items():
            self.writer.add_scalar(key.replace("val_", "val/", 1), value, step)
        self.writer.add_scalar("epoch", row["epoch"], step)
        test = trainer.data.test
        indices = spread_indices(len(test), IMAGES_PER_EPOCH)
        threshold = shown_threshold(result.evaluator)
        for sample in samples_from_evaluation(result.evaluator, test, indices):
            image = side_by_side(sample, trainer.data.classes, threshold)
            self.writer.add_image(f"predictions/image_{sample.image_id}", image, step)
        self.writer.flush()

    def on_interrupt(self, trainer: Trainer, reason: str) -> None:
        self._close()

    def on_train_end(self, trainer: Trainer) -> None:
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
