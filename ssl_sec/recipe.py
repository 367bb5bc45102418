"""The whole recipe schema, assembled above the registries that own parts of it.

`Config` is the core (`ssl_sec.config.BaseConfig`) plus `loss`, one sub-section per term of
`ssl_sec.terms.TERMS`, plus one section per method of `ssl_sec.methods.METHODS` that has
options (`moco:`), each named after its registry entry. The registry names (`method`,
`eval.knn_backend`) are checked here, so that the modules below import no registry and
there is no import circle: config <- terms, methods, evaluation <- recipe <- engine, cli.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import field, make_dataclass
from pathlib import Path

from .config import (
    AugmentConfig,
    BaseConfig,
    Need,
    _build,
    _merge,
    _read_yaml,
    check_sections,
    parse_overrides,
    show,
)
from .errors import ConfigError
from .evaluation.knn import BACKENDS
from .methods import METHODS
from .terms import TERMS


def _loss_check(self, need: Need) -> None:
    check_sections(self, need)


LossConfig = make_dataclass(
    "LossConfig",
    [(name, term.Options, field(default_factory=term.Options)) for name, term in TERMS.items()],
    namespace={"check": _loss_check, "__module__": __name__,
               "__doc__": "The objective: one section per term (ssl_sec/terms/)."})

Config = make_dataclass(
    "Config",
    [("loss", LossConfig, field(default_factory=LossConfig)),
     *[(name, method.Options, field(default_factory=method.Options))
       for name, method in METHODS.items() if method.Options is not None]],
    bases=(BaseConfig,),
    namespace={"__module__": __name__,
               "__doc__": "A pretraining recipe: the core sections, the objective's terms "
                          "(`loss.<term>`) and each method's options (`<method>:`)."})

# Keys of recipes written before each loss term had its own section: a stored config
# (checkpoint, config.yaml) is read with them moved; a recipe or override that uses one is
# told the new name.
RENAMED = {"temperature": "infonce.temperature", "w_infonce": "infonce.weight",
           "w_circle": "circle.weight", "circle_margin": "circle.margin",
           "circle_gamma": "circle.gamma", "sec_eta": "sec.eta", "sec_ramp": "sec.ramp",
           "sec_mu": "sec.mu", "sec_momentum": "sec.momentum", "sec_on": "sec.features"}


def check(cfg: Config) -> None:
    """Every range check: the registry names, each section's own fields, then the method's
    checks across sections. Raises ConfigError."""
    need = Need()
    need.choice("method", cfg.method, METHODS)
    cfg.check(need)
    need.choice("eval.knn_backend", cfg.eval.knn_backend, BACKENDS)
    METHODS[cfg.method].check_config(cfg, need)


def from_dict(values: dict, overrides: list[str] | None = None) -> Config:
    """Build and validate a Config from a nested dict plus dotted overrides."""
    merged = _merge(values or {}, parse_overrides(overrides or []))
    _refuse_renamed(merged)
    if isinstance(merged.get("augment2"), dict):
        # The second view's keys that are not given take the first view's values.
        first = _build(AugmentConfig, merged.get("augment", {}), "augment.")
        merged["augment2"] = {**dataclasses.asdict(first), **merged["augment2"]}
    cfg = _build(Config, merged, "")
    check(cfg)
    return cfg


def from_stored(values: dict, overrides: list[str] | None = None) -> Config:
    """A config stored by a run (a checkpoint's, config.yaml), read with `upgrade`."""
    return from_dict(upgrade(values), overrides)


def upgrade(values: dict) -> dict:
    """A stored config dict with the keys of older versions moved to their current place."""
    loss = values.get("loss") if isinstance(values, dict) else None
    if not isinstance(loss, dict) or not any(k in RENAMED for k in loss):
        return values
    values = copy.deepcopy(values)
    loss = values["loss"]
    for old, new in RENAMED.items():
        if old in loss:
            term, key = new.split(".")
            loss.setdefault(term, {})[key] = loss.pop(old)
    return values


def _refuse_renamed(values: dict) -> None:
    loss = values.get("loss")
    if isinstance(loss, dict):
        for key in loss:
            if key in RENAMED:
                raise ConfigError(f"'loss.{show(key).strip(chr(39))}' is now "
                                  f"'loss.{RENAMED[key]}' (each loss term has its own "
                                  "section); rename it in the recipe or override")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a recipe YAML (safe_load) and apply `key=value` overrides."""
    path = Path(path)
    cfg = from_dict(_read_yaml(path, "recipes/quickstart.yaml"), overrides)
    # A class list named in a recipe is found beside the recipe (recipes/imagenet100/).
    listed = cfg.data.classes_file
    if listed and not Path(listed).is_absolute() and (path.parent / listed).is_file():
        cfg.data.classes_file = str((path.parent / listed).resolve())
    return cfg


__all__ = ["RENAMED", "Config", "LossConfig", "check", "from_dict", "from_stored",
           "load_recipe", "upgrade"]
