"""Which folder a run writes, and the run it continues there: ``--resume`` (with the settings
that may change), a run torchrun restarted (``--max-restarts``: the group continues the run it
started), ``--out`` and ``--overwrite``, and a new ``runs/<name>`` otherwise. Rank 0 decides and
locks the folder (:mod:`detfit.engine.runlock`); every rank gets its answer or its refusal.

The :class:`~detfit.engine.trainer.Trainer` asks a :class:`RunFolder` once, before anything is
built: :meth:`RunFolder.choose` answers with a :class:`RunChoice` (the folder, the settings to
train with, which are the resumed run's own when it continues one, and the state it continues),
and :meth:`RunFolder.start_writing` makes and locks the folder once the data and model are
checked.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detfit import distributed
from detfit.checkpoint import RUN_FILES, ResumeState, holds_run, resume_state
from detfit.config import SPEED_UPS_OFF, TrainConfig
from detfit.engine.runlock import RunLock
from detfit.errors import DetfitError, RunRefused
from detfit.fileio import remove_stale_temp_files
from detfit.paths import DEFAULT_RUNS_DIR

# Settings that may change when a run is resumed; any other change is refused.
RESUMABLE = (
    "epochs",
    "workers",
    "device",
    "threads",
    "print_freq",
    "checkpoint_every_iters",
    "data_root",
    "eval_batch_size",
    "eval_backend",
    "plots",
    "logger",
    "time_budget",
    "patience",
    *SPEED_UPS_OFF,  # execution only: the function, state dict and optimizer state are the same
)


def new_run_dir(name: str, root: Path = DEFAULT_RUNS_DIR) -> Path:
    """``runs/<name>``, ``runs/<name>-2``, ... whichever is free first."""
    for n in range(1, 10_000):
        path = root / (name if n == 1 else f"{name}-{n}")
        if not path.exists():
            return path
    raise RuntimeError(f"no free run folder under {root}")


def checkpoint_stat(path: Path | None) -> tuple[int, int] | None:
    """(mtime, size) of a checkpoint (a run folder's last.pt): whether it changed since read."""
    if path is None:
        return None
    path = path / "last.pt" if path.is_dir() else path
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def resume_command(run_dir: Path) -> str:
    """The command that continues ``run_dir``, launched the way this process was."""
    resume = f"-m detfit train --resume {shlex.quote(str(run_dir))}"
    if distributed.world_size() == 1 and not distributed.launched_with_torchrun():
        return f"detfit train --resume {shlex.quote(str(run_dir))}"
    nodes = distributed.num_nodes()
    launch = f"torchrun --nproc_per_node {distributed.local_world_size()}"
    if nodes > 1:
        launch += f" --nnodes {nodes} --rdzv-backend c10d --rdzv-endpoint HOST:PORT"
    return f"{launch} {resume}"


@dataclass
class RunChoice:
    """What :meth:`RunFolder.choose` decided: the folder, the settings the run trains with, the
    state it continues (None: a new run), and whether that run has already finished (an
    elastic restart after the last epoch's checkpoint)."""

    run_dir: Path
    cfg: TrainConfig
    checkpoint: ResumeState | None
    finished: bool


class RunFolder:
    """Choosing, locking and starting a run's folder, and loading the run a resume continues.

    ``cfg``: the new run's settings, or None with ``resume_from`` (a run folder or last.pt);
    ``overrides``: the settings a resume may change (:data:`RESUMABLE`); ``overwrite``: start
    over in an ``out`` folder that holds a run; ``log`` prints (rank 0 only where it matters).
    """

    def __init__(
        self,
        cfg: TrainConfig | None,
        resume_from: Path | None,
        overrides: dict[str, Any],
        overwrite: bool,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg, self.resume_from = cfg, resume_from
        self.overrides, self.overwrite = overrides, overwrite
        self._log = log
        self.checkpoint: ResumeState | None = None
        self.finished = False
        self.lock: RunLock | None = None  # held by rank 0 while the run writes
        self.run_dir: Path | None = None
        self._resumed_stat: tuple[int, int] | None = None
        self._loaded = resume_from is None  # the resumed run's last.pt is read once

    def log(self, message: str) -> None:
        if distributed.is_main():
            self._log(message)

    def settings(self) -> TrainConfig:
        """The settings before the folder is chosen: the new run's, or the resumed run's own
        (read from its last.pt, with the overrides applied)."""
        if not self._loaded:
            self._loaded = True
            self._load_resume(self.resume_from)
        assert self.cfg is not None
        return self.cfg

    def choose(self) -> RunChoice:
        """Decide the folder (rank 0, which also locks it; the same answer on every rank, a
        refusal raised on every rank with rank 0's message)."""
        self.settings()
        run_dir = self._choose_run_dir()
        self.run_dir = run_dir
        return RunChoice(run_dir, self.cfg, self.checkpoint, self.finished)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _load_resume(self, path: Path, finished_ok: bool = False) -> None:
        """Load the run to continue; with ``finished_ok`` a run that has trained all its epochs
        sets :attr:`finished` instead of being refused. A run folder with config.yaml and no
        checkpoint yet (the run died before its first one) starts over from its settings."""
        path = Path(path)
        if path.is_dir() and not (path / "last.pt").exists() and (path / "config.yaml").is_file():
            self._restart_from_scratch(path)
            return
        self._resumed_stat = checkpoint_stat(path)
        ckpt = resume_state(path)
        self.run_dir = path if path.is_dir() else path.parent
        cfg = TrainConfig.from_dict(ckpt.config, f"{self.run_dir}/last.pt")
        self._check_same_run(cfg)
        changed = self._apply_overrides(cfg)
        done = ckpt.done
        complete = cfg.epochs < done or (cfg.epochs == done and ckpt.evaluated)
        planned = (ckpt.budget or {}).get("planned", cfg.epochs)
        if ckpt.stopped and ckpt.evaluated:
            # a time budget or patience ended it: done, unless one of those settings changed
            complete = complete or not {"epochs", "time_budget", "patience"} & set(changed)
        elif planned == done and ckpt.evaluated and "time_budget" not in changed:
            complete = complete or "epochs" not in changed
        if complete and finished_ok:
            self.finished = True
        elif complete:
            why = f" ({ckpt.stopped})" if ckpt.stopped else ""
            raise DetfitError(
                f"--resume {self.run_dir}: the run has already trained {done} epoch(s){why}; "
                f"give --epochs N with N > {done} (or a longer --time) to train it further"
            )
        self.cfg, self.checkpoint = cfg, ckpt

    def _check_same_run(self, cfg: TrainConfig) -> None:
        """last.pt must be the checkpoint of the run whose config.yaml is beside it: one copied
        from another run would otherwise rewrite this run's files with the other model's."""
        try:
            folder = TrainConfig.load(self.run_dir / "config.yaml")
        except (DetfitError, OSError):
            return  # no readable config.yaml: last.pt is all there is of the run
        if folder.run_id and cfg.run_id != folder.run_id:
            raise DetfitError(
                f"--resume {self.run_dir}: last.pt belongs to another run (run_id "
                f"{cfg.run_id or 'none'}, config.yaml says {folder.run_id}); it was copied from "
                "elsewhere: resume that run's own folder"
            )

    def _apply_overrides(self, cfg: TrainConfig) -> dict[str, Any]:
        """Apply the resumable overrides to ``cfg``; returns the settings that changed."""
        changed = {
            k: v
            for k, v in self.overrides.items()
            if v is not None and getattr(cfg, k, None) != v and k not in ("out",)
        }
        refused = sorted(set(changed) - set(RESUMABLE))
        if refused:
            raise DetfitError(
                f"--resume {self.run_dir}: {', '.join(refused)} cannot change when a run "
                f"continues (it can: {', '.join(RESUMABLE)}); to train with other settings "
                f"start a new run: --config {self.run_dir}/config.yaml"
            )
        for key, value in changed.items():
            setattr(cfg, key, value)
        return changed

    def _restart_from_scratch(self, run_dir: Path) -> None:
        """--resume of a run that stopped before its first checkpoint: nothing to continue, so it
        starts over in its folder with its config.yaml (a new run id), saying so."""
        self.run_dir = run_dir
        cfg = TrainConfig.load(run_dir / "config.yaml")
        self._apply_overrides(cfg)
        cfg.out, cfg.run_id = str(run_dir), None
        self.cfg, self.overwrite = cfg, True
        if distributed.env_is_main():
            self._log(
                f"{run_dir}: no checkpoint yet (the run stopped before its first one): starting "
                "it over from scratch with its config.yaml"
            )

    def _choose_run_dir(self) -> Path:
        """The run folder, decided by rank 0 (which also locks it) and the same on every rank; a
        refusal is raised on every rank with rank 0's message."""
        cfg = self.cfg
        if self.checkpoint is None and distributed.elastic_max_restarts() > 0 and not cfg.out:
            raise RunRefused(
                "torchrun --max-restarts needs --out RUN: a restarted group continues the run "
                "in that folder"
            )
        decided: tuple[str, str | None, bool] = ("", None, False)
        if distributed.is_main():
            resumed = self.checkpoint is not None
            try:
                run_dir = self._claim_run_dir()
                decided = (str(run_dir), None, not resumed and self.checkpoint is not None)
            except DetfitError as exc:  # every rank stops with rank 0's one line
                decided = ("", str(exc), False)
        run_dir, refusal, continued = distributed.broadcast_from_main(decided)
        if refusal is not None:
            raise RunRefused(refusal)
        if continued and not distributed.is_main():  # rank 0 continues its restarted run
            self._load_resume(Path(run_dir), finished_ok=True)
        return Path(run_dir)

    def _restarted_own_run(self, run_dir: Path) -> bool:
        """True in a group torchrun restarted, when ``run_dir``'s run is this launch's own."""
        return distributed.elastic_restart_count() > 0 and RunLock(run_dir).ours()

    def _lock(self, run_dir: Path) -> None:
        self.lock = self.lock or RunLock(run_dir)
        self.lock.acquire()

    def _claim_run_dir(self) -> Path:
        """Rank 0: the folder to write, locked when it exists (a new one is locked as it is made,
        in :meth:`_setup`). A restart never turns ``overwrite`` on: it continues the run only when
        this launch started it, and otherwise decides as the first attempt did."""
        cfg = self.cfg
        if self.checkpoint is not None:  # --resume
            self._lock(self.run_dir)
            if self._resumed_stat != checkpoint_stat(
                self.resume_from
            ):  # it changed while we waited
                self._load_resume(self.resume_from)
            return self.run_dir
        if not cfg.out:
            return new_run_dir(cfg.model)
        run_dir = Path(cfg.out)
        if run_dir.exists() and not run_dir.is_dir():
            raise RunRefused(f"--out {run_dir}: is a file; give a folder for the run")
        if run_dir.is_dir():
            self._lock(run_dir)
        if self._restarted_own_run(run_dir):  # torchrun restarted us: continue our own run
            restart = distributed.elastic_restart_count()
            if (run_dir / "last.pt").is_file():
                # the group may have been killed after the last epoch's checkpoint
                self._load_resume(run_dir, finished_ok=True)
                self.log(
                    f"restart {restart}: {run_dir} has finished all {self.cfg.epochs} epochs"
                    if self.finished
                    else f"restart {restart}: continuing {run_dir}"
                )
            else:  # it stopped before its first checkpoint: its files are ours to replace
                self.log(f"restart {restart}: starting {run_dir} over (no checkpoint yet)")
                self.overwrite = True
            return run_dir
        self._refuse_a_held_run(run_dir)
        return run_dir

    def _refuse_a_held_run(self, run_dir: Path) -> None:
        if holds_run(run_dir) and not self.overwrite:
            raise RunRefused(
                f"{run_dir}: already holds a run; continue it with --resume {run_dir}, or "
                "give --overwrite to start over in it"
            )

    def start_writing(self, cfg: TrainConfig) -> None:
        """Rank 0: make and lock the folder (a race for a new one is decided here: the second
        process finds it locked, or holding the first one's run), then write config.yaml."""
        fresh = self.lock is None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DetfitError(
                f"cannot make the run folder {self.run_dir}: {exc.strerror}"
            ) from None
        self._lock(self.run_dir)
        if fresh and self.checkpoint is None and not self.overwrite:
            self._refuse_a_held_run(self.run_dir)
        self.lock.claim()
        remove_stale_temp_files(self.run_dir)
        if self.overwrite and self.checkpoint is None:
            for name in RUN_FILES:
                (self.run_dir / name).unlink(missing_ok=True)
        cfg.save(self.run_dir / "config.yaml")
