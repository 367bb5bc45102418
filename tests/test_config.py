"""Strict recipes: unknown keys, wrong types and out-of-range values are errors."""

from pathlib import Path

import pytest

from ssl_sec.config import parse_overrides, to_yaml
from ssl_sec.errors import ConfigError
from ssl_sec.recipe import Config, from_dict, load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads(path):
    if path.parent.name == "linear":
        from ssl_sec.config import LinearConfig, load_linear_recipe

        assert isinstance(load_linear_recipe(path), LinearConfig)
        return
    cfg = load_recipe(path)
    assert isinstance(cfg, Config)
    stem = path.stem.replace("_", "-")
    # recipes/<dataset>/<x>.yaml is named <dataset>-<x>; the quick starts at the top by their stem
    assert cfg.name == (stem if path.parent.name == "recipes" else f"{path.parent.name}-{stem}")


def test_overrides_apply_and_parse_types():
    cfg = from_dict({}, ["optim.lr=0.3", "loss.sec.eta=0.1", "data.classes=[0,1,2]",
                         "model.cifar_stem=false", "data.root=/tmp/x"])
    assert cfg.optim.lr == 0.3 and cfg.loss.sec.eta == 0.1
    assert cfg.data.classes == [0, 1, 2] and cfg.model.cifar_stem is False
    assert cfg.data.root == "/tmp/x"
    assert from_dict({"optim": {"lr": 1}}).optim.lr == 1.0  # int accepted for a float
    assert parse_overrides(["a.b=1"]) == {"a": {"b": 1}}


@pytest.mark.parametrize("override,fragment", [
    ("optim.lrr=0.1", "unknown key 'optim.lrr'"),
    ("bogus=1", "unknown key 'bogus'"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.lr=abc", "'optim.lr' must be float"),
    ("optim.epochs=1.5", "'optim.epochs' must be int"),
    ("augment.gray_p=1.5", "augment.gray_p"),
    ("augment.jitter_p=-0.1", "augment.jitter_p"),
    ("loss.infonce.temperature=0", "loss.infonce.temperature"),
    ("loss.infonce.temperature=-1", "loss.infonce.temperature"),
    ("optim.batch_size=1", "optim.batch_size"),
    ("augment.crop_scale=[0.9,0.1]", "augment.crop_scale"),
    ("data.dataset=mnist", "data.dataset"),
    ("model.arch=vit", "model.arch"),
    ("loss.sec.ramp=cubic", "loss.sec.ramp"),
    ("model.cifar_stem=3", "'model.cifar_stem' must be bool"),
    ("optim=3", "optim must be a mapping"),
    ("optim.lr", "key=value"),
    ("optim.warmup_epochs=500", "optim.warmup_epochs"),
])
def test_bad_values_are_config_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        from_dict({}, [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        load_recipe(typo)
    # safe_load: python tags are refused, not executed.
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(evil)


def test_yaml_round_trip():
    cfg = from_dict({}, ["optim.lr=0.5", "loss.sec.eta=0.2"])
    import yaml

    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg


def test_dataset_names_come_from_the_registry():
    from ssl_sec.data import DATASETS

    for name in DATASETS:
        assert from_dict({}, [f"data.dataset={name}"]).data.dataset == name
    with pytest.raises(ConfigError, match="data.dataset"):
        from_dict({}, ["data.dataset=stl100"])


def test_augment2_inherits_unset_keys_and_must_match_the_size():
    cfg = from_dict({"augment": {"size": 64, "blur_p": 1.0, "hue": 0.2},
                     "augment2": {"blur_p": 0.1, "solarize_p": 0.2}})
    assert (cfg.augment2.size, cfg.augment2.hue, cfg.augment2.blur_p) == (64, 0.2, 0.1)
    assert cfg.augment.solarize_p == 0.0 and cfg.augment2.solarize_p == 0.2
    assert from_dict({}).augment2 is None and from_dict({"augment2": None}).augment2 is None
    with pytest.raises(ConfigError, match="augment2.size"):
        from_dict({"augment2": {"size": 48}})
    with pytest.raises(ConfigError, match="augment2.solarize_p"):
        from_dict({}, ["augment2.solarize_p=2"])
    assert "augment2" in to_yaml(cfg)
