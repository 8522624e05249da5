"""The recipe adapts to the data: the resize for small objects in large images, proposal counts
for crowded images, the user's own values kept, config.yaml recording it, and data check."""

from __future__ import annotations

import re
from dataclasses import replace

import yaml

from conftest import run_main
from detfit.config import RECIPES, recipe_config
from detfit.data.adapt import DataSizes, adapt_options
from detfit.data.loaders import Datasets
from detfit.engine.trainer import adapt_to_data

CPU = RECIPES["cpu"]["model_options"]
PHOTOS = DataSizes(short_side=3000, long_side=4000, object_size=60, max_objects=4)


def test_small_objects_in_large_images_get_a_larger_resize_within_twice_the_recipes():
    # at 416 px (700 px long-side cap: x0.175) a 60 px object would be 8 px: double, at most
    choices = {c.key: c for c in adapt_options(dict(CPU), CPU, PHOTOS, True)}
    assert choices["min_size"].value == [704, 768, 832, 896, 832]
    assert choices["max_size"].value == 1408
    assert "would be 8 px at 416; 17 px now" in choices["min_size"].why
    assert "at most twice the recipe's sizes" in choices["min_size"].why
    # objects a little too small: just enough growth, in multiples of 32
    near = DataSizes(short_side=400, long_side=600, object_size=28, max_objects=4)
    assert adapt_options({}, {}, replace(near, object_size=8), False) == []  # SSD: no min_size
    choices = adapt_options({}, {}, near, True)  # torchvision's 800 / 1333: 56 px, fine
    assert choices == []
    choices = {c.key: c.value for c in adapt_options({}, {}, replace(near, object_size=8), True)}
    assert choices == {"min_size": 1600, "max_size": 2688}  # 800 x 2 and 1333 x 2, rounded up


def test_the_users_own_values_win():
    mine = {**CPU, "min_size": 512}
    assert [c.key for c in adapt_options(mine, CPU, PHOTOS, True)] == []
    crowded = replace(PHOTOS, object_size=400, max_objects=60)
    (choice,) = adapt_options(dict(CPU), CPU, crowded, True)
    assert (choice.key, choice.value) == ("rpn_post_nms_top_n_test", 300)  # 5 x 60 > 150
    assert "150 is too few for an image of 60 objects" in choice.why
    assert adapt_options({**CPU, "rpn_post_nms_top_n_test": 100}, CPU, crowded, True) == []


def test_choices_are_logged_and_recorded_in_config_yaml(tmp_path):
    cfg = recipe_config("cpu")
    logs: list[str] = []
    data = Datasets(train=[], test=[], classes=["__background__", "x"], sizes=PHOTOS)
    adapt_to_data(cfg, data, logs.append)
    assert logs[0].startswith("adapted to the data: model_options.min_size: [704, 768, 832, 896")
    assert logs[1] == "adapted to the data: model_options.max_size: 1408 (with min_size)"
    cfg.save(tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["model_options"]
    assert saved["min_size"] == [704, 768, 832, 896, 832] and saved["max_size"] == 1408
    assert saved["fpn_channels"] == CPU["fpn_channels"]  # the rest as the recipe has it


def test_data_check_prints_what_each_recipe_would_choose(synthetic_root, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "data", "check", f"masks:{synthetic_root}")
    assert code == 0
    assert re.search(r"  sizes: median image \d+ x \d+ px, median object \d+ px, at most \d", out)
    assert "  recipe cpu: its sizes and proposal counts suit this data" in out
    assert "  recipe tutorial: its sizes and proposal counts suit this data" in out
