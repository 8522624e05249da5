"""Typed settings: what parses, how overrides merge, what `detfit settings` lists, and that the
recipes and config.yaml files stay as they were."""

from __future__ import annotations

import pytest
import yaml

from conftest import run_main
from detfit.config import (
    BUDGET_EPOCHS,
    RECIPES,
    SettingsError,
    TrainConfig,
    merge_settings,
    recipe_config,
    settings_table,
)

# The CPU recipe as it was tuned (BENCHMARKS.md): the typed settings must not change one value.
CPU_RECIPE = {
    "model": "maskrcnn_mobilenet_v2_fpn",
    "weights": None,
    "weights_backbone": "IMAGENET1K_V1",
    "model_options": {
        "min_size": [352, 384, 416, 448, 416],
        "max_size": 700,
        "trainable_backbone_layers": 4,
        "fpn_channels": 128,
        "mask_head_channels": 256,
        "mask_head_norm": True,
        "box_batch_size_per_image": 64,
        "rpn_pre_nms_top_n_train": 1000,
        "rpn_post_nms_top_n_train": 500,
        "rpn_pre_nms_top_n_test": 500,
        "rpn_post_nms_top_n_test": 150,
        "box_detections_per_img": 30,
    },
    "time_budget": "30m",
    "epochs": 22,
    "optimizer": "adamw",
    "lr": 0.0004,
    "weight_decay": 0.0001,
    "warmup_iters": 100,
    "lr_schedule": "cosine",
    "clip_grad_norm": 10.0,
    "loss_weights": {"loss_mask": 2.0},
    "ema_decay": 0.99,
    "photometric": True,
    "workers": 1,
}


def test_cpu_recipe_values_are_unchanged():
    cfg = recipe_config("cpu", uncap=False).to_dict()
    assert {k: cfg[k] for k in CPU_RECIPE} == CPU_RECIPE
    assert recipe_config("cpu").epochs == BUDGET_EPOCHS  # the 30 minutes plan the epochs
    assert list(cfg["model_options"]) == list(CPU_RECIPE["model_options"])  # order kept too
    assert cfg["recipe"] == "cpu" and RECIPES["tutorial"] == {}


def test_config_yaml_round_trip_is_plain_yaml(tmp_path):
    cfg = recipe_config("cpu", data_root="data/PennFudanPed", epochs=3)
    cfg.save(tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "!!" not in text  # no Python tags: any YAML reader reads it
    assert yaml.safe_load(text) == cfg.to_dict()
    assert TrainConfig.load(tmp_path / "config.yaml") == cfg
    assert list(yaml.safe_load(text))[:3] == ["model", "weights", "weights_backbone"]


def test_attribute_access_and_validated_assignment():
    cfg = TrainConfig()
    cfg.data_root = "somewhere"
    cfg.epochs = 3
    assert (cfg.data_root, cfg.epochs) == ("somewhere", 3)
    with pytest.raises(SettingsError, match=r"^epochs=0: must be greater than or equal to 1$"):
        cfg.epochs = 0
    assert cfg.epochs == 3
    assert cfg.replace(lr=0.1).lr == 0.1 and cfg.lr == 0.005


def test_values_are_converted_only_where_safe():
    cfg = TrainConfig(lr="1e-3", model_options={"anchor_sizes": ((32,), (64,))})
    assert cfg.lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    assert cfg.model_options["anchor_sizes"] == [[32.0], [64.0]]  # tuples become YAML lists
    for bad in ({"epochs": "10"}, {"epochs": True}, {"lr": True}, {"amp": "maybe"}):
        with pytest.raises(SettingsError):
            TrainConfig(**bad)


def test_new_run_settings_and_their_ranges():
    cfg = TrainConfig(checkpoint_every_iters=50, lr_scaling="linear", sync_bn=True)
    assert (cfg.world_size, cfg.global_batch_size) == (1, None)
    for bad in (
        {"checkpoint_every_iters": 0},
        {"lr_scaling": "sqrt"},
        {"world_size": 0},
        {"global_batch_size": 0},
    ):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_merge_settings_is_the_one_merge():
    base = recipe_config("cpu").to_dict()
    merged = merge_settings(
        base,
        {"epochs": 2, "out": None, "model_options": {"min_size": 64}},
        ["model_options.max_size=96", "loss_weights.loss_box_reg=0.5", "lr=1.0e-3"],
    )
    assert merged["epochs"] == 2 and merged["out"] is None  # None: not given
    assert merged["model_options"]["min_size"] == 64 and merged["model_options"]["max_size"] == 96
    assert merged["model_options"]["fpn_channels"] == 128  # merged, not replaced
    assert merged["loss_weights"] == {"loss_mask": 2.0, "loss_box_reg": 0.5}
    assert merged["lr"] == 0.001
    # base untouched
    assert base["epochs"] == BUDGET_EPOCHS and base["model_options"]["min_size"] != 64
    assert recipe_config("cpu", model_options={"min_size": 64}).model_options["max_size"] == 700


def test_settings_command_lists_every_setting(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "settings", "--recipe", "tutorial")
    assert code == 0, err
    assert out.splitlines()[0] == "recipe tutorial"
    names = {line.split()[0] for line in out.splitlines()[2:]}
    assert set(TrainConfig.model_fields) <= names
    assert {"model_options.min_size", "model_options.trainable_backbone_layers"} <= names
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "int in [1, 100000]" in lines["epochs"] and "10" in lines["epochs"]
    assert "float in [0, 1]" in lines["hflip_prob"]
    assert "sgd | adamw" in lines["optimizer"]
    assert "also write last.pt every N training iterations" in lines["checkpoint_every_iters"]
    assert all(row[3] for row in settings_table())  # every setting says what it means


def test_settings_shows_the_recipe_train_would_use(monkeypatch, capsys):
    """Without --recipe: the recipe `detfit train` picks on this machine (cpu without CUDA), with
    that recipe's values, model options included."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, out, err = run_main(monkeypatch, capsys, "settings")
    assert code == 0, err
    assert out.splitlines()[0] == "recipe cpu (auto on this machine)"
    header = out.splitlines()[1]
    start, end = header.index(" cpu ") + 1, header.index("meaning")  # the value column
    values = {line.split()[0]: line[start:end].strip() for line in out.splitlines()[2:]}
    assert values["epochs"] == str(RECIPES["cpu"]["epochs"]) == "22"
    assert values["time_budget"] == "30m"
    assert values["optimizer"] == "adamw"
    assert values["model_options.max_size"] == "700"
    assert values["model_options.size"] == "-"  # not set by the recipe
    assert values["hflip_prob"] == "0.5"  # not set by the recipe: TrainConfig's default


def test_recipe_auto_resolves_and_an_unknown_recipe_names_every_choice():
    import torch

    from detfit.config import SettingsError, TrainConfig, resolve_recipe

    expected = "tutorial" if torch.cuda.is_available() else "cpu"
    assert resolve_recipe("auto") == expected
    assert TrainConfig.from_dict({"recipe": "auto"}, "f.yaml").recipe == expected
    with pytest.raises(SettingsError, match=r"^recipe='cpx': must be one of auto, tutorial, cpu"):
        resolve_recipe("cpx")
