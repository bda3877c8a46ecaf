"""Experiment configuration: YAML files, component references, dotted overrides, validation.

An experiment YAML names its components by ``type`` and may point at a component file with
``config: configs/backbones/yolov8n.yaml``; the file's keys are defaults that the experiment and
the command line override. Merging and ``a.b=c`` overrides use OmegaConf (no global Hydra: sam2
initialises its own). Every fixed section is a dataclass schema (:mod:`vfmkd.core.config_schema`), so
an unknown key or a wrong type is an error that names the key and the closest valid one; component
keys are checked later against the component's constructor (see :mod:`vfmkd.core.registry`).
"""
from __future__ import annotations

import copy
import importlib
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from vfmkd.core.config_schema import ExperimentConfig
from vfmkd.core.errors import ConfigError, did_you_mean

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPONENT_REF_KEY = "config"


def _schema_keys(schema: Any, dotted: str) -> List[str]:
    """Valid keys at a dotted location of a dataclass schema (for suggestions); list indices
    (``train.stages.0`` or ``train.stages[0]``) step into the list's element type."""
    node = schema
    for part in [p for p in re.split(r"[.\[\]]", dotted) if p]:
        if part.isdigit() and get_origin(node) in (list, List):
            node = get_args(node)[0]
        elif is_dataclass(node) and part in (hints := get_type_hints(node)):
            node = hints[part]
        else:
            return []
        if get_origin(node) is Union:  # Optional[X] -> X
            node = next(a for a in get_args(node) if a is not type(None))
    return [f.name for f in fields(node)] if is_dataclass(node) else []


def _explain(exc: OmegaConfBaseException, schema: Any, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)):
        parent, _, leaf = str(key).rpartition(".")
        valid = _schema_keys(schema, parent)
        hint = did_you_mean(leaf, valid)
        where = f" in section '{parent}'" if parent else ""
        return ConfigError(
            f"{source}: unknown config key '{key}'{where}.{hint} Valid keys here: {', '.join(valid)}."
        )
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"{source}: wrong type for '{key}': {msg}.")
    return ConfigError(f"{source}: {exc}")


def read_yaml(path: str | Path) -> Dict[str, Any]:
    """``yaml.safe_load`` a mapping, with errors that name the file."""
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def resolve_path(path: str | Path) -> Path:
    """Relative paths resolve against the working directory, then the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    in_repo = REPO_ROOT / p
    return in_repo if in_repo.exists() else p


def split_overrides(overrides: Sequence[str]) -> List[Tuple[str, Any]]:
    """Dotted ``a.b=c`` overrides as (key, value) pairs, values parsed as YAML (``[1, 2]``, ``null``,
    ``3e-4``). Hydra's ``+a.b=c`` (add a key) is accepted too: mapping sections such as ``teachers``
    and ``distillation.losses`` take new keys. A list entry is addressed by its index
    (``train.stages.0.epochs=5``)."""
    bad = [o for o in overrides if "=" not in o or o.lstrip("+").startswith("=")]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value, got: {' '.join(bad)}")
    pairs = []
    for item in overrides:
        key, _, text = item.lstrip("+").partition("=")
        try:  # OmegaConf's own value grammar, as on Hydra's command line
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
        except OmegaConfBaseException as exc:
            raise ConfigError(f"cannot parse the override {item!r}: {exc}") from exc
        pairs.append((key.strip(), value))
    return pairs


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """Dotted overrides as one nested mapping (for a section without lists, e.g. a teacher's kwargs)."""
    cfg = OmegaConf.create()
    for key, value in split_overrides(overrides):
        OmegaConf.update(cfg, key, value, merge=True)
    return cfg


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], schema_cls: Any, source: str) -> None:
    """Apply dotted overrides in place, key by key, so that list entries can be addressed by index."""
    for key, value in split_overrides(overrides):
        _check_list_indices(cfg, key, source)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise _explain(exc, schema_cls, f"{source} (override {key}={value!r})") from exc


def _check_list_indices(cfg: DictConfig, key: str, source: str) -> None:
    parts = key.split(".")
    for i, part in enumerate(parts[1:], start=1):
        parent = OmegaConf.select(cfg, ".".join(parts[:i]))
        if OmegaConf.is_list(parent) and part.isdigit() and int(part) >= len(parent):
            where = ".".join(parts[:i])
            have = f"indices 0..{len(parent) - 1}" if len(parent) else "no entries"
            raise ConfigError(f"{source}: override {key}: {where} has {len(parent)} entries ({have}); "
                              f"edit an existing one or add the entry in the YAML file")


def merge_with_schema(schema_cls: Any, *layers: Any, source: str) -> DictConfig:
    """Merge plain/DictConfig layers onto a dataclass schema, turning OmegaConf errors into ConfigError."""
    base = OmegaConf.structured(schema_cls)
    try:
        return OmegaConf.merge(base, *layers)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema_cls, source) from exc


# Other spellings of a teacher key: the design document writes a teacher's checkpoint file as
# ``model_path``. The code knows only the canonical name; an alias is renamed when an entry is
# resolved (resolve_component), for the experiment YAML, the command line and component files alike.
TEACHER_KEY_ALIASES = {"model_path": "checkpoint"}


def _canonical_keys(entry: Dict[str, Any], where: str, source: str) -> Dict[str, Any]:
    """``entry`` with its aliases renamed to their canonical keys. Giving both spellings with
    different values is an error (``null`` counts as not given: it means "the default file")."""
    if not (where == "teacher" or where.startswith("teachers.")):
        return entry
    out = dict(entry)
    for alias, canonical in TEACHER_KEY_ALIASES.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        if out.get(canonical) is not None and value is not None and out[canonical] != value:
            raise ConfigError(
                f"{source}: {where} sets both {canonical}={out[canonical]!r} and its alias {alias}={value!r}; "
                f"'{alias}' is another name for '{canonical}': keep one of them (to override the file's value on the "
                f"command line, use the spelling the file uses).")
        if value is not None or canonical not in out:
            out[canonical] = value
    return out


def resolve_component(entry: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Merge a component entry over the file its ``config`` key points to (entry keys win).
    Teacher key aliases (``model_path``) become their canonical key in each layer first."""
    entry = _canonical_keys(dict(entry), where, where)
    ref = entry.get(COMPONENT_REF_KEY)
    if not ref:
        return entry
    base = _canonical_keys(read_yaml(ref), where, str(ref))
    nested = {k: v for k, v in entry.items()}
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), OmegaConf.create(nested)))
    assert isinstance(merged, dict)
    if "type" in base and "type" in entry and base["type"] != entry["type"]:
        raise ConfigError(f"{where}: type '{entry['type']}' but {ref} describes a '{base['type']}'")
    return merged


def component_kwargs(entry: Dict[str, Any], reserved: Sequence[str] = ()) -> Dict[str, Any]:
    """Constructor kwargs of a resolved component entry: everything but type/config/reserved keys."""
    skip = {"type", COMPONENT_REF_KEY, *reserved}
    return {k: copy.deepcopy(v) for k, v in entry.items() if k not in skip}


# Keys of a teacher entry that say how vfmkd uses the teacher, not how to build it.
TEACHER_USAGE_KEYS = ("enabled", "offline", "feature_path")


def teacher_kwargs(entry: Dict[str, Any]) -> Dict[str, Any]:
    """Constructor kwargs of a resolved teacher entry."""
    return component_kwargs(entry, reserved=TEACHER_USAGE_KEYS)


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Load an experiment YAML, apply overrides, resolve component references, validate sections.

    Returns a plain nested dict (the resolved config that is saved into the run directory).
    Component kwargs are validated against their constructors when the components are built.
    """
    return experiment_from_dict(read_yaml(path), overrides, str(path))


def experiment_from_dict(raw: Dict[str, Any], overrides: Sequence[str] = (), path: str = "<config>") -> Dict[str, Any]:
    """:func:`load_experiment` on an already read YAML mapping (the command-line shortcuts
    ``--backbone/--teacher/--dataset`` edit it first, see :mod:`vfmkd.utils.cli`)."""
    cfg = merge_with_schema(ExperimentConfig, raw, source=path)
    apply_overrides(cfg, overrides, ExperimentConfig, path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    import_custom_modules(resolved["custom_imports"])
    model = resolved["model"]
    if not model["backbone"].get("type"):
        raise ConfigError(f"{path}: model.backbone needs a 'type' (e.g. yolov8) and usually a 'config' file")
    if not model["heads"]:
        raise ConfigError(f"{path}: model.heads is empty; add e.g. detection: {{type: yolo_head, num_classes: 80}}")
    model["backbone"] = resolve_component(model["backbone"], "model.backbone")
    model["neck"] = resolve_component(model["neck"], "model.neck")
    model["heads"] = {k: resolve_component(v, f"model.heads.{k}") for k, v in model["heads"].items()}
    teachers = {}
    for name, entry in resolved["teachers"].items():
        if not isinstance(entry, dict):
            raise ConfigError(f"teachers.{name} must be a mapping, got {entry!r}")
        entry = resolve_component(entry, f"teachers.{name}")
        entry.setdefault("type", name)
        teachers[name] = entry
    resolved["teachers"] = teachers
    for name, entry in resolved["distillation"]["losses"].items():
        if not isinstance(entry, dict):
            raise ConfigError(f"distillation.losses.{name} must be a mapping, got {entry!r}")
        entry.setdefault("type", name)
    _resolve_epochs(resolved["train"], str(path))
    _check_ranges(resolved)
    return resolved


DEFAULT_EPOCHS = 100


def _resolve_epochs(train: Dict[str, Any], source: str) -> None:
    """``train.epochs`` is the sum of the stages' epochs when stages are given (a contradicting
    value is an error), else its value (100 when unset)."""
    if not train["stages"]:
        train["epochs"] = DEFAULT_EPOCHS if train["epochs"] is None else train["epochs"]
        return
    total = sum(int(s["epochs"]) for s in train["stages"])
    if train["epochs"] is not None and train["epochs"] != total:
        raise ConfigError(
            f"{source}: train.epochs={train['epochs']} but train.stages add up to {total} epochs; drop train.epochs "
            f"(it follows the stages) or change the stages' epochs (e.g. train.stages.0.epochs=N).")
    train["epochs"] = total


def import_custom_modules(modules: Sequence[str]) -> None:
    """Import user modules that register their own components (``custom_imports``)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"custom_imports: cannot import '{name}' ({exc}). Put its package on PYTHONPATH or install it "
                f"(pip install -e path/to/your/package)."
            ) from exc


def check_offline_ratio(value: float) -> float:
    """``distillation.offline_ratio`` as a float in [0, 1]; ConfigError otherwise (the one rule)."""
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"distillation.offline_ratio must be within [0, 1], got {value}")
    return float(value)


def _check_ranges(cfg: Dict[str, Any]) -> None:
    data, train, dist, aug = cfg["data"], cfg["train"], cfg["distillation"], cfg["data"]["augment"]
    rd = cfg["model"]["resolution_distill"]
    check_offline_ratio(dist["offline_ratio"])
    checks = [
        (
            1.0 < rd["sr_target_scale"] <= 4.0,
            f"model.resolution_distill.sr_target_scale must be in (1, 4], got {rd['sr_target_scale']}",
        ),
        (
            0.0 < rd["fa_subscale"] <= 1.0,
            f"model.resolution_distill.fa_subscale must be in (0, 1] (0.125 = 8x8 pooling), got {rd['fa_subscale']}",
        ),
        (rd["feat_channels"] >= 1, f"model.resolution_distill.feat_channels must be >= 1, got {rd['feat_channels']}"),
        (rd["mode"] in ("single", "dual"), f"model.resolution_distill.mode must be single or dual, got '{rd['mode']}'"),
        (rd["task_weight_high"] >= 0 and rd["task_weight_low"] >= 0,
         "model.resolution_distill: task_weight_high and task_weight_low must be >= 0"),
        (cfg["model"]["infer_scale"] is None or 0.0 < cfg["model"]["infer_scale"] <= 1.0,
         f"model.infer_scale must be in (0, 1] (0.5 = half the canvas side) or null, got "
         f"{cfg['model']['infer_scale']}"),
        (
            rd["sr_loss_weight"] >= 0 and rd["fa_loss_weight"] >= 0,
            "model.resolution_distill: sr_loss_weight and fa_loss_weight must be >= 0",
        ),
        (data["img_size"] % 32 == 0 and data["img_size"] > 0, "data.img_size must be a positive multiple of 32"),
        (data["batch_size"] >= 1, "data.batch_size must be >= 1"),
        (data["num_workers"] >= 0, "data.num_workers must be >= 0"),
        (data["limit"] is None or data["limit"] >= 1, "data.limit must be >= 1 (or null for all images)"),
        (train["epochs"] >= 1, "train.epochs must be >= 1"),
        (train["lr"] > 0, "train.lr must be > 0"),
        (train["optimizer"] in ("adamw", "sgd"), f"train.optimizer must be adamw or sgd, got '{train['optimizer']}'"),
        (train["accumulate"] >= 1, "train.accumulate must be >= 1"),
        (
            isinstance(train["amp"], bool) or train["amp"] == "auto",
            f"train.amp must be auto, true or false, got {train['amp']!r}",
        ),
        (
            train["save_interval_steps"] >= 0,
            "train.save_interval_steps must be >= 0 (0 = checkpoints at epoch ends only)",
        ),
        (train["max_nonfinite_steps"] >= 1, "train.max_nonfinite_steps must be >= 1"),
        (train["save_period"] >= 0, "train.save_period must be >= 0 (0 = no periodic checkpoint_epoch{E}.pt)"),
        (train["warmup_epochs"] >= 0, "train.warmup_epochs must be >= 0 (0 = use train.warmup_iters)"),
        (train["vis_interval"] >= 0, "train.vis_interval must be >= 0 (0 = no visualizations)"),
        (dist["distill_interval"] >= 1, "distillation.distill_interval must be >= 1"),
        (
            dist["offline_max_shift"] >= 0.0,
            "distillation.offline_max_shift must be >= 0 (0.05 = 5 % of the teacher canvas)",
        ),
        (
            dist["missing_cache"] in ("error", "online"),
            f"distillation.missing_cache must be error or online, got '{dist['missing_cache']}'",
        ),
        (
            0.0 <= aug["fliplr"] <= 1.0
            and 0.0 <= aug["scale"] < 1.0
            and 0.0 <= aug["translate"] <= 0.5
            and 0.0 <= aug["degrees"] <= 180,
            "data.augment: fliplr in [0, 1], scale in [0, 1), translate in [0, 0.5], degrees in [0, 180]",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def experiment_record(cfg: Dict[str, Any]) -> ExperimentConfig:
    """A resolved config (:func:`load_experiment`) as typed sections: ``record.train.lr``,
    ``record.data.augment.fliplr``, ... Component entries (``model``, ``teachers``,
    ``distillation.losses``) stay mappings: the builders unpack them into constructor arguments."""
    record = OmegaConf.to_object(merge_with_schema(ExperimentConfig, cfg, source="resolved config"))
    assert isinstance(record, ExperimentConfig)
    return record


def save_config(cfg: Dict[str, Any], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
