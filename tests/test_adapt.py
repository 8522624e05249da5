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
from detfit.models.policy import adapt_to_data

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
    # adapt_to_data: false keeps the recipe's numbers, without a line
    cfg, logs = recipe_config("cpu", adapt_to_data=False), []
    adapt_to_data(cfg, data, logs.append)
    assert logs == [] and cfg.model_options == recipe_config("cpu").model_options


def test_data_check_prints_what_each_recipe_would_choose(synthetic_root, monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "data", "check", f"masks:{synthetic_root}")
    assert code == 0
    assert re.search(r"  sizes: median image \d+ x \d+ px, median object \d+ px, at most \d", out)
    assert "  recipe cpu: its sizes, anchors and proposal counts suit this data" in out
    assert "  recipe tutorial: its sizes, anchors and proposal counts suit this data" in out


RCNN_ANCHORS = ((32,), (64,), (128,), (256,), (512,))  # torchvision's R-CNN FPN anchors


def test_anchors_follow_objects_far_from_their_sizes():
    from detfit.data.adapt import adapt_anchors

    fine = DataSizes(400, 600, 60, 4, small_object=20, large_object=200)
    assert adapt_anchors(RCNN_ANCHORS, {}, fine, True) is None  # 800 px: 40 to 400 px objects
    tiny = replace(fine, small_object=6)  # x2 at 800 px: 12 px, under half of 32
    choice = adapt_anchors(RCNN_ANCHORS, {}, tiny, True)
    assert choice.value == [[16], [32], [64], [128], [256]]
    assert "12 px or less once resized, under half the smallest anchor (32 px)" in choice.why
    tinier = replace(fine, small_object=2)  # 4 px: a quarter, never more than that
    assert adapt_anchors(RCNN_ANCHORS, {}, tinier, True).value == [[8], [16], [32], [64], [128]]
    huge = DataSizes(400, 600, 300, 2, small_object=300, large_object=1000)  # 2000 px resized
    assert adapt_anchors(RCNN_ANCHORS, {}, huge, True).value[-1] == [1024]  # 2000 < 4 x 512
    assert adapt_anchors(RCNN_ANCHORS, {"anchor_sizes": [[8]] * 5}, tiny, True) is None  # yours


def test_a_run_on_small_objects_records_its_adapted_anchors(tmp_path):
    """A real (tiny) run on objects of 8-12 px, resized x0.32: the anchors are quartered, the
    line is logged, config.yaml and the checkpoint's model info record them, and the model
    rebuilt from best.pt has them."""
    import torch

    from detfit.checkpoint import load_model
    from detfit.config import TrainConfig
    from detfit.data.synthetic import write_scattered_coco
    from detfit.engine import Trainer
    from detfit.models.options import anchor_generator_of
    from test_trainer import tiny

    coco = write_scattered_coco(tmp_path / "data", 6, (200, 300), 3, object_size=(8, 12))
    settings = tiny(tmp_path, tmp_path / "run", epochs=1, max_iters_per_epoch=1).to_dict()
    settings.update(dataset=f"coco:{coco}", data_root=None, num_test=2)
    logs: list[str] = []
    run = Trainer(TrainConfig.from_dict(settings), progress=False, log=logs.append).fit()
    (line,) = [s for s in logs if "anchor_sizes" in s]
    # detfit's MobileNetV2-FPN: 4 maps of 2 sizes each, from (32, 64) up, quartered
    assert line.startswith(
        "adapted to the data: model_options.anchor_sizes: [[8, 16], [16, 32], [32, 64], [64, 128]]"
        " (a tenth of the objects are 3 px or less once resized, under half the smallest anchor"
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())["model_options"]
    assert saved["anchor_sizes"] == [[8, 16], [16, 32], [32, 64], [64, 128]]
    model = load_model(run).model
    assert anchor_generator_of(model).sizes == ((8, 16), (16, 32), (32, 64), (64, 128))
    assert isinstance(model(torch.rand(1, 3, 200, 300))[0]["boxes"], torch.Tensor)
    # the same run with adapt_to_data: false keeps the model's own anchors
    settings.update(adapt_to_data=False, out=str(tmp_path / "fixed"))
    logs.clear()
    run = Trainer(TrainConfig.from_dict(settings), progress=False, log=logs.append).fit()
    assert not [s for s in logs if "adapted to the data" in s]
    assert "anchor_sizes" not in yaml.safe_load((run / "config.yaml").read_text())["model_options"]
    model = load_model(run).model
    assert anchor_generator_of(model).sizes == ((32, 64), (64, 128), (128, 256), (256, 512))


def test_data_check_names_the_anchors_it_would_choose(tmp_path, monkeypatch, capsys):
    from detfit.data.synthetic import write_scattered_coco

    coco = write_scattered_coco(tmp_path, 3, (1200, 1800), 3, object_size=(8, 12))
    code, out, _ = run_main(monkeypatch, capsys, "data", "check", f"coco:{coco}")
    assert code == 0, out
    # at 832 px (the cpu recipe's sizes, doubled at most) 8-12 px objects are still 6-8 px
    assert "recipe cpu would choose model_options.anchor_sizes: [[8, 16], [16, 32], [32, 64]" in out
    assert "recipe tutorial would choose model_options.anchor_sizes: [[16], [32], [64]" in out
    assert "a tenth of the objects are 6 px or less once resized" in out
