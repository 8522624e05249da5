"""benchmarks/recipe_sweep.py: variants merge into the recipe as documented, run side by side,
and their AP per epoch comes back in one summary; the committed sweep files are valid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, SMALL
from detfit.config import RECIPES, TrainConfig

sys.path.insert(0, str(REPO / "benchmarks"))
from recipe_sweep import variant_config  # noqa: E402


@pytest.mark.parametrize(
    "name", ["cpu_recipe.yaml", "cpu_recipe_round2.yaml", "accuracy_methods.yaml"]
)
def test_committed_sweeps_are_valid_configs(name):
    spec = yaml.safe_load((REPO / "benchmarks" / "sweeps" / name).read_text())
    assert spec["recipe"] == "cpu" and len(spec["variants"]) >= 9
    for overrides in spec["variants"].values():
        cfg = variant_config("cpu", overrides or {})
        # model options are merged into the recipe's, not replacing them
        assert set(RECIPES["cpu"]["model_options"]) <= set(cfg.model_options)


def test_variant_overrides_merge_model_options():
    cfg = variant_config("cpu", {"lr": 0.1, "model_options": {"box_positive_fraction": 0.5}})
    assert cfg.lr == 0.1 and cfg.model_options["box_positive_fraction"] == 0.5
    assert cfg.model_options["fpn_channels"] == RECIPES["cpu"]["model_options"]["fpn_channels"]
    assert cfg.recipe == "cpu"


def test_variants_train_the_recipes_epochs_without_its_time_budget():
    assert RECIPES["cpu"]["time_budget"] and RECIPES["cpu"]["epochs"] == 22
    cfg = variant_config("cpu", {})
    assert cfg.time_budget is None and cfg.epochs == 22
    assert variant_config("cpu", {"epochs": 27}).epochs == 27
    budgeted = variant_config("cpu", {"time_budget": "10m"})
    assert budgeted.time_budget == "10m" and budgeted.epochs == 22
    assert RECIPES["cpu"]["weights_backbone"] is not None
    assert variant_config("cpu", {"weights_backbone": None}).weights_backbone is None


def test_sweep_runs_variants_in_parallel_and_summarises(synthetic_root, tmp_path):
    tiny = {
        "weights_backbone": None,
        "epochs": 2,
        "max_iters_per_epoch": 1,
        "num_test": 2,
        "workers": 0,
        "model_options": dict(SMALL),
    }
    variants = {
        "plain": tiny,
        "mask_x3": {**tiny, "loss_weights": {"loss_mask": 3.0}},
        "typo": {**tiny, "loss_weights": {"loss_msk": 3.0}},  # fails at its first iteration
    }
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"recipe": "cpu", "variants": variants}, sort_keys=False))
    summary = tmp_path / "summary.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "recipe_sweep.py"),
            str(spec),
            "--data-root",
            str(synthetic_root),
            "--out",
            str(tmp_path / "out"),
            "--summary",
            str(summary),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # the failed variant makes the sweep fail, naming it; the others' results still come back
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 variant(s) failed: typo" in result.stderr
    table = json.loads(summary.read_text())
    assert list(table) == ["plain", "mask_x3", "typo"] and table["typo"] == []
    for name in ("plain", "mask_x3"):  # each variant's summary is what its own run recorded
        recorded = json.loads((tmp_path / "out" / name / "metrics.json").read_text())
        assert [r["epoch"] for r in table[name]] == [1, 2]
        for row, run_row in zip(table[name], recorded, strict=True):
            assert {k: run_row[k] for k in row} == row
    # the mask loss counted three times is a different training
    assert table["mask_x3"][0]["train_loss"] != table["plain"][0]["train_loss"]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("typo: exit 1: ") and "loss_msk not among" in lines[0]
    assert lines[1].startswith("3 variants, ")
    assert lines[2].split()[:3] == ["variant", "ep1", "box/segm"]
    assert [line.split()[0] for line in lines[3:6]] == ["plain", "mask_x3", "typo"]
    cfg = TrainConfig.load(tmp_path / "out" / "mask_x3" / "config.yaml")
    assert cfg.loss_weights == {"loss_mask": 3.0} and cfg.model_options["fpn_channels"] == 32
    assert cfg.model_options["box_batch_size_per_image"] == SMALL["box_batch_size_per_image"]
    assert Path(cfg.data_root) == synthetic_root
