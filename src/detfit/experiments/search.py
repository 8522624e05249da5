"""A search file for ``detfit tune``: the base settings, the space over any settings, and how to
score and prune trials, all checked before any trial starts.

.. code-block:: yaml

    name: cpu-lr                      # the study's name (default: the file's stem)
    recipe: cpu                       # the base: a recipe, or config: a settings file
    settings: {epochs: 4}             # fixed changes to the base, for every trial
    space:
      lr: {low: 1.0e-4, high: 3.0e-3, log: true}     # a float on a log scale
      warmup_iters: {low: 0, high: 300, step: 50}    # integers (both bounds integers)
      model_options.min_size: {choices: [352, 416, [352, 384, 416]]}
      photometric: [true, false]                     # a plain list: choices
    metric: segm_AP                   # what a trial scores (default: the model's, as best.pt)
    pruner: median                    # median, hyperband or none
    seed: 0                           # the sampler's seed

Every value a parameter can take (its bounds, each choice) is checked with the same typed
:class:`~detfit.config.TrainConfig` a training checks, so a range a setting does not allow is
one line naming the file and the key, not a failed trial an hour later.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detfit.config import (
    RECIPES,
    SettingsError,
    TrainConfig,
    did_you_mean,
    known_model_options,
    load_settings,
    merge_settings,
    one_of,
    recipe_config,
)
from detfit.errors import DetfitError

TOP_KEYS = ("name", "recipe", "config", "settings", "space", "metric", "pruner", "seed")
PRUNERS = ("median", "hyperband", "none")
ENTRY_KEYS = ("low", "high", "log", "step", "type", "choices")
# settings the tuner sets for each trial itself
OWNED = ("out",)
IOU_TYPES = ("bbox", "segm", "keypoints")


class SearchError(DetfitError):
    """A search file that cannot run: the message names the file and the key."""


def _primitive(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range, or choices. ``key`` is the setting's name,
    dotted for a key inside a mapping (``model_options.min_size``)."""

    key: str
    kind: str  # float, int or choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    @property
    def encoded(self) -> bool:
        """Optuna's choices are plain values: lists (``min_size: [352, 416]``) go as JSON."""
        return not all(_primitive(c) for c in self.choices)

    def suggest(self, trial: Any) -> Any:
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            step = int(self.step or 1)
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), log=self.log, step=step
            )
        if self.encoded:
            texts = [json.dumps(c) for c in self.choices]
            return json.loads(trial.suggest_categorical(self.key, texts))
        return trial.suggest_categorical(self.key, list(self.choices))

    def decode(self, value: Any) -> Any:
        """A value as optuna stored it, as the setting takes it."""
        return json.loads(value) if self.kind == "choice" and self.encoded else value

    def candidates(self) -> list[tuple[str, Any]]:
        """(what, value) for the values checked against the settings: bounds or each choice."""
        if self.kind == "choice":
            return [("choice", c) for c in self.choices]
        cast = int if self.kind == "int" else float
        return [("low", cast(self.low)), ("high", cast(self.high))]

    def describe(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"choices": list(self.choices)}
        entry = {"type": self.kind, "low": self.low, "high": self.high, "log": self.log}
        return {**entry, **({"step": self.step} if self.step else {})}


@dataclass
class Search:
    """A parsed, checked search file."""

    path: Path
    name: str
    base: dict[str, Any]  # the settings every trial starts from (base + fixed settings)
    space: list[Param]
    metric: str | None = None
    pruner: str = "median"
    seed: int | None = None

    def trial_settings(self, values: dict[str, Any]) -> dict[str, Any]:
        """The base with a trial's values put in (dotted keys reach into mappings)."""
        settings = copy.deepcopy(self.base)
        for key, value in values.items():
            set_dotted(settings, key, value)
        return settings

    def describe(self) -> dict[str, Any]:
        """What makes two searches the same study (study.yaml): not the trial counts or time."""
        return {
            "name": self.name,
            "base": self.base,
            "space": {p.key: p.describe() for p in self.space},
            "metric": self.metric,
            "pruner": self.pruner,
            "seed": self.seed,
        }


def set_dotted(settings: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = settings
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = copy.deepcopy(value)


def _number(value: Any, where: str) -> float | int:
    """A bound: a number, or a YAML 1.1 string such as ``1e-4`` (which YAML reads as text)."""
    if isinstance(value, bool):
        raise SearchError(f"{where}: must be a number, not {value!r}")
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SearchError(f"{where}: must be a number, not {value!r}") from None


def parse_param(key: Any, entry: Any, where: str) -> Param:
    """One ``space`` entry: ``{low, high[, log, step, type]}``, ``{choices: [...]}`` or a list."""
    if not isinstance(key, str) or not key:
        raise SearchError(f"{where}: {key!r} is not a setting name")
    if isinstance(entry, list):
        entry = {"choices": entry}
    if not isinstance(entry, dict):
        raise SearchError(
            f"{where}: expected {{low: A, high: B}}, {{choices: [...]}} or a list, not {entry!r}"
        )
    unknown = [k for k in entry if k not in ENTRY_KEYS]
    if unknown:
        raise SearchError(
            f"{where}.{unknown[0]}: not a key of a parameter ({', '.join(ENTRY_KEYS)})"
            f"{did_you_mean(str(unknown[0]), ENTRY_KEYS)}"
        )
    if "choices" in entry:
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise SearchError(f"{where}.choices: must be a non-empty list")
        if set(entry) - {"choices"}:
            raise SearchError(
                f"{where}: choices cannot go with {', '.join(set(entry) - {'choices'})}"
            )
        return Param(key, "choice", choices=tuple(choices))
    if "low" not in entry or "high" not in entry:
        raise SearchError(f"{where}: a range needs low and high (or give choices)")
    low, high = _number(entry["low"], f"{where}.low"), _number(entry["high"], f"{where}.high")
    kind = entry.get("type")
    if kind is None:
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
    if kind not in ("int", "float"):
        raise SearchError(f"{where}.type: {one_of(str(kind), ['int', 'float'])}")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise SearchError(f"{where}: an int range needs integer bounds, not {low!r}, {high!r}")
    if not low < high:
        raise SearchError(f"{where}: low ({low!r}) must be below high ({high!r})")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise SearchError(f"{where}.log: must be true or false, not {log!r}")
    if log and low <= 0:
        raise SearchError(f"{where}: a log scale needs low > 0, not {low!r}")
    step = entry.get("step")
    if step is not None:
        step = _number(step, f"{where}.step")
        if step <= 0 or log:
            raise SearchError(f"{where}.step: must be > 0, and cannot go with log: true")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def check_key(param: Param, where: str) -> None:
    """The key names a setting (or a key of a mapping setting, or a model option)."""
    first, _, rest = param.key.partition(".")
    fields = TrainConfig.model_fields
    if first not in fields:
        raise SearchError(f"{where}: not a setting{did_you_mean(first, list(fields))}")
    if first in OWNED:
        raise SearchError(f"{where}: detfit tune sets {first} for each trial itself")
    default = fields[first].get_default(call_default_factory=True)
    if rest and not isinstance(default, dict):
        raise SearchError(f"{where}: {first} is a single value, it has no keys to search")
    if first == "model_options" and rest not in known_model_options():
        options = sorted(known_model_options())
        raise SearchError(f"{where}: no model takes this option{did_you_mean(rest, options)}")


def check_values(param: Param, base: dict[str, Any], where: str) -> None:
    """Each bound or choice, put into the base, passes the typed settings."""
    for what, value in param.candidates():
        settings = copy.deepcopy(base)
        set_dotted(settings, param.key, value)
        try:
            TrainConfig.from_dict(settings)
        except SettingsError as exc:
            problem = str(exc).splitlines()[0]
            problem = problem.split(": ", 1)[1] if ": " in problem else problem
            raise SearchError(f"{where}: {what} {value!r} is not allowed: {problem}") from None


def check_metric(metric: Any, base: dict[str, Any], space: list[Param], where: str) -> None:
    from detfit.eval.coco import STAT_NAMES
    from detfit.models import iou_types

    iou, _, stat = str(metric).partition("_")
    names = [f"{t}_{s}" for t in IOU_TYPES for s in STAT_NAMES]
    if iou not in IOU_TYPES or stat not in STAT_NAMES:
        raise SearchError(
            f"{where}: {metric!r} is not a COCO metric{did_you_mean(str(metric), names)}"
        )
    models = next((p.choices for p in space if p.key == "model"), (base["model"],))
    for model in models:
        if iou not in iou_types(model):
            raise SearchError(
                f"{where}: {model} is not scored on {iou} (it gives {iou_types(model)})"
            )


def base_settings(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The recipe's or the config file's settings, with the fixed ``settings`` merged on top."""
    if "recipe" in data and "config" in data:
        raise SearchError(f"{path}: give recipe or config, not both")
    if "config" in data:
        config = Path(str(data["config"]))
        config = config if config.is_absolute() else path.parent / config
        base = load_settings(config)
    else:
        recipe = data.get("recipe", "auto")
        if recipe == "auto":
            import torch

            recipe = "tutorial" if torch.cuda.is_available() else "cpu"
        if recipe not in RECIPES:
            raise SearchError(f"{path}: recipe {recipe!r}: {one_of(str(recipe), list(RECIPES))}")
        base = recipe_config(recipe, uncap=False).to_dict()
    fixed = data.get("settings") or {}
    if not isinstance(fixed, dict):
        raise SearchError(f"{path}: settings: must be a mapping of settings to values")
    merged = merge_settings(base, fixed)
    merged.pop("out", None)
    try:
        return TrainConfig.from_dict(merged, f"{path}: settings").to_dict()
    except SettingsError as exc:
        raise SearchError(str(exc).splitlines()[0]) from None


def load_search(path: str | Path) -> Search:
    """Parse and check ``path``; every problem is a one-line :class:`SearchError`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SearchError(f"{path}: cannot read the search ({first})") from None
    if not isinstance(data, dict):
        raise SearchError(f"{path}: a search file must be a mapping (name, recipe, space, ...)")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise SearchError(
            f"{path}: {unknown[0]!r} is not a key of a search file{did_you_mean(str(unknown[0]), TOP_KEYS)}"
        )
    space = data.get("space")
    if not isinstance(space, dict) or not space:
        raise SearchError(f"{path}: space: must map settings to ranges or choices")
    base = base_settings(data, path)
    params = []
    for key, entry in space.items():
        where = f"{path}: space.{key}"
        param = parse_param(key, entry, where)
        check_key(param, where)
        check_values(param, base, where)
        params.append(param)
    metric = data.get("metric")
    if metric is not None:
        check_metric(metric, base, params, f"{path}: metric")
    pruner = data.get("pruner", "median")
    if pruner not in PRUNERS:
        raise SearchError(f"{path}: pruner: {one_of(str(pruner), PRUNERS)}")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SearchError(f"{path}: seed: must be an integer, not {seed!r}")
    name = str(data.get("name") or path.stem)
    return Search(path, name, base, params, metric=metric, pruner=pruner, seed=seed)
