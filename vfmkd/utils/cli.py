"""Shared command-line plumbing of the tools: the experiment (``CONFIG`` or ``--config``), dotted
``key=value`` overrides and the shortcut flags ``--backbone/--teacher/--dataset``; the training tool's ``--preset``.

The shortcut flags are sugar for config changes, resolved in one place (:func:`apply_shortcuts`)
on the experiment YAML before the overrides and before validation:

* ``--backbone NAME`` replaces ``model.backbone`` with ``{type: <the file's type>, config:
  configs/backbones/NAME.yaml}``: an explicit override of the file's backbone, inline keys included.
* ``--teacher NAME`` (repeatable, or comma-separated) keeps only those teachers enabled. A name
  that is not among the config's teachers, a teacher the file disables, or a loss that needs a
  teacher the flag leaves out is an error that says what to change.
* ``--dataset NAME`` sets ``data.dataset`` and, where the file sets no ``data.root``,
  ``data.root: datasets/NAME``. A file whose ``data.dataset`` names another dataset is an error.
* ``--preset NAME`` (= ``train.preset=NAME``) applies the memory preset ``configs/presets/NAME.yaml``
  (:mod:`vfmkd.utils.presets`): experiment file < preset < shortcut flags < ``key=value`` overrides.
"""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from vfmkd.core.config import REPO_ROOT, experiment_from_dict, read_yaml, resolve_path
from vfmkd.core.errors import (
    CacheMismatchError,
    CheckpointError,
    ConfigError,
    DatasetError,
    NonFiniteLossError,
    did_you_mean,
)
from vfmkd.utils.logging import get_logger, setup_logging
from vfmkd.utils.presets import describe, frozen_keys, preset_changes, preset_names, resolve_preset, with_changes
from vfmkd.utils.stop_signals import Stopped, stop_signals

USER_ERRORS = (ConfigError, CheckpointError, CacheMismatchError, DatasetError, FileNotFoundError, NonFiniteLossError)
# an output that cannot be written (full disk, quota, file-size limit, read-only, no permission, a file in
# the way): a user-fixable condition, reported in one line with exit 2 (errors marked ``user_error`` too)
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                         errno.ENOTDIR, errno.EEXIST, errno.EISDIR})

BACKBONE_DIR = "configs/backbones"
CONFIG_SUFFIXES = (".yaml", ".yml")
CHECKPOINT_SUFFIXES = (".pt", ".pth")

OVERRIDES_HELP = (
    "dotted overrides of the config, Hydra style, e.g. train.epochs=3 data.batch_size=8 data.limit=16 "
    "work_dir=/tmp/runs teachers.sam.input_size=512; an unknown key is an error that names the closest valid key"
)

SHORTCUTS_EPILOG = """\
shortcut flags (sugar for config changes, applied to the YAML before the key=value overrides,
which win over them):
  --backbone NAME  model.backbone = {type: <its type>, config: configs/backbones/NAME.yaml}; replaces
                   the file's backbone entry (an explicit override). Names: the files in configs/backbones/.
  --teacher NAME   only these teachers distil (repeat, or NAME,NAME); the others get enabled: false.
                   Error: a name not under the config's teachers, a teacher the file disables, or a
                   loss whose teacher the flag leaves out.
  --dataset NAME   data.dataset = NAME, and data.root = datasets/NAME where the file sets no root.
                   Error: the file's data.dataset names another dataset (drop the flag or edit the file).
  --preset NAME    (tools/train.py) = train.preset=NAME: a memory preset, configs/presets/NAME.yaml
                   (gpu_24g_plus, gpu_16g, gpu_8g, cpu) or auto (from the GPU's memory). It moves only
                   levers: file < preset < shortcut flags < key=value overrides.
"""


def experiment_parser(description: str, checkpoint: bool = False,
                      preset: Optional[bool] = None) -> argparse.ArgumentParser:
    """The parser of a tool that runs an experiment: ``CONFIG [CHECKPOINT] [key=value ...]``
    (positional, mmdet style) or ``--config CONFIG [--checkpoint CKPT]``, plus the shortcut flags
    (``--preset`` by default where there is no checkpoint: the training tool). Parse with
    :func:`parse_experiment_args`."""
    usage_pos = "CONFIG CHECKPOINT" if checkpoint else "CONFIG"
    forms = (f"forms:\n  %(prog)s {usage_pos} [options] [key=value ...]\n"
             f"  %(prog)s --config CONFIG{' --checkpoint CHECKPOINT' if checkpoint else ''} [options] [key=value "
             "...]\n\n")
    parser = argparse.ArgumentParser(description=description, epilog=forms + SHORTCUTS_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML, e.g. configs/experiments/yolov8_sam_coco128.yaml "
                                         "(or give it as the first positional argument)")
    if checkpoint:
        parser.add_argument("--checkpoint", help="a checkpoints/best.pt or last.pt written by tools/train.py "
                                                 "(or give it as the positional argument after CONFIG)")
    parser.add_argument("--backbone", metavar="NAME",
                        help="student backbone: configs/backbones/NAME.yaml, e.g. yolov8s")
    parser.add_argument("--teacher", metavar="NAME", action="append", default=[],
                        help="distil only from these teachers of the config (repeatable or comma-separated), e.g. sam2")
    parser.add_argument("--dataset", metavar="NAME", help="dataset under datasets/NAME, e.g. coco128")
    if not checkpoint if preset is None else preset:
        parser.add_argument("--preset", metavar="NAME", help=f"memory preset (= train.preset=NAME): "
                            f"{', '.join(preset_names())}, or auto (picked from the GPU's memory)")
    parser.add_argument("args", nargs="*", metavar=f"{usage_pos} key=value",
                        help=f"{usage_pos} (unless given with --config{'/--checkpoint' if checkpoint else ''}), then "
                             + OVERRIDES_HELP)
    return parser


def sort_positionals(args: argparse.Namespace, expected: str, how: str = "") -> List[str]:
    """Move ``args.args`` into ``args.config`` / ``args.checkpoint`` (by suffix, where the parser
    has that attribute and it is still unset) and return the ``key=value`` overrides; any other
    token is an error naming what was expected."""
    overrides: List[str] = []
    for token in args.args:
        if "=" in token:
            overrides.append(token)
        elif getattr(args, "config", "") is None and token.endswith(CONFIG_SUFFIXES):
            args.config = token
        elif getattr(args, "checkpoint", "") is None and token.endswith(CHECKPOINT_SUFFIXES):
            args.checkpoint = token
        else:
            raise ConfigError(f"unexpected argument '{token}': expected {expected} {how} followed by key=value "
                              f"overrides, e.g. train.epochs=3; see --help".replace("  ", " "))
    return overrides


def parse_experiment_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse, then sort the positionals into ``config``, ``checkpoint`` (tools that take one) and
    ``overrides``. A positional that is neither an expected ``.yaml``/``.pt`` file nor ``key=value``
    is an error."""
    args = parser.parse_intermixed_args(argv)
    wants_checkpoint = hasattr(args, "checkpoint")
    expected = "CONFIG.yaml CHECKPOINT.pt" if wants_checkpoint else "CONFIG.yaml"
    overrides = sort_positionals(args, expected, "(positional or "
                                                 f"--config{'/--checkpoint' if wants_checkpoint else ''})")
    if args.config is None and getattr(args, "resume", None):
        # --resume alone continues the run with its own resolved config.
        run = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).resolve().parent.parent
        args.config = str(run / "config.yaml")
    if args.config is None:
        raise ConfigError(f"no experiment config: give it first, e.g. `{parser.prog} "
                          "configs/experiments/yolov8_sam_coco128.yaml`, or with --config")
    if wants_checkpoint and args.checkpoint is None:
        raise ConfigError(f"no checkpoint: `{parser.prog} CONFIG work_dirs/<run>/checkpoints/best.pt` "
                          "(or --checkpoint)")
    args.overrides = overrides
    args.teacher = [n for value in args.teacher for n in value.split(",") if n]
    return args


def load_experiment_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The validated experiment of parsed tool arguments: YAML, preset, shortcut flags, then overrides."""
    raw = apply_shortcuts(read_yaml(args.config), str(args.config), backbone=args.backbone,
                          teachers=args.teacher, dataset=args.dataset)
    return apply_preset(raw, args.overrides, str(args.config), getattr(args, "preset", None))


PRESET_KEY = "train.preset"


def apply_preset(
    raw: Dict[str, Any], overrides: Sequence[str], source: str, flag: Optional[str] = None
) -> Dict[str, Any]:
    """The validated experiment of ``raw`` (shortcut flags applied) and ``overrides`` with the memory
    preset applied: the one of ``train.preset=`` among the overrides, else ``--preset`` (``flag``),
    else the file's ``train.preset``; none (the default) leaves the experiment as written. The preset's
    levers go under the overrides (which win, see :func:`vfmkd.utils.presets.preset_changes`); the
    resolved name is recorded as ``train.preset`` and logged once with what it moved."""
    rest = [o for o in overrides if o.lstrip("+").partition("=")[0].strip() != PRESET_KEY]
    asked = [o.partition("=")[2].strip() for o in overrides if o not in rest]
    name = asked[-1] if asked else flag or (raw.get("train") or {}).get("preset")
    if name in (None, "", "null", "none"):
        return experiment_from_dict(raw, rest, source)
    preset, why = resolve_preset(str(name))
    changes = preset_changes(preset, experiment_from_dict(raw, rest, source), frozen_keys(rest))
    raw = with_changes(raw, changes)
    raw["train"] = {**(raw.get("train") or {}), "preset": preset.name}
    get_logger().info("%s", describe(preset, why, changes))
    return experiment_from_dict(raw, rest, source)


def apply_shortcuts(raw: Dict[str, Any], source: str, backbone: Optional[str] = None,
                    teachers: Sequence[str] = (), dataset: Optional[str] = None) -> Dict[str, Any]:
    """The experiment mapping ``raw`` with ``--backbone/--teacher/--dataset`` applied (the rules
    are in the module docstring); ``raw`` itself is left unchanged."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    if backbone:
        out["model"] = {**out.get("model", {}), "backbone": _backbone_entry(backbone)}
    if teachers:
        out["teachers"] = _select_teachers(out.get("teachers") or {}, out.get("distillation") or {}, teachers, source)
    if dataset:
        out["data"] = _dataset_section(out.get("data") or {}, dataset, source)
    return out


def _backbone_entry(name: str) -> Dict[str, Any]:
    path = Path(BACKBONE_DIR) / f"{name}.yaml"
    if not resolve_path(path).is_file():
        known = sorted(p.stem for p in (REPO_ROOT / BACKBONE_DIR).glob("*.yaml"))
        raise ConfigError(
            f"--backbone {name}: there is no {path}.{did_you_mean(name, known)} Known backbones "
            f"({BACKBONE_DIR}/*.yaml): {', '.join(known)}. Add your own file there, or set model.backbone in the "
            "config.")
    kind = read_yaml(path).get("type")
    if not kind:
        raise ConfigError(f"--backbone {name}: {path} has no 'type' key (e.g. type: yolov8)")
    return {"type": kind, "config": str(path)}


def _select_teachers(entries: Dict[str, Any], distillation: Dict[str, Any], names: Sequence[str],
                     source: str) -> Dict[str, Any]:
    for name in names:
        if name not in entries:
            raise ConfigError(
                f"--teacher {name}: {source} has no teacher '{name}'.{did_you_mean(name, entries)} Its teachers: "
                f"{', '.join(entries) or 'none'}. Add a teachers.{name} entry to the config (e.g. "
                f"{name}: {{config: configs/teachers/{name}.yaml, offline: true, feature_path: "
                f"teacher_features/{name}/}}), or pick one of its teachers.")
        entry = entries[name]
        if isinstance(entry, dict) and entry.get("enabled", True) is False:
            raise ConfigError(
                f"--teacher {name}: {source} disables teachers.{name} (enabled: false); set enabled: true there "
                f"(or teachers.{name}.enabled=true), or drop the flag.")
    selected = {}
    for name, entry in entries.items():
        entry = dict(entry) if isinstance(entry, dict) else entry
        if name not in names and isinstance(entry, dict):
            entry["enabled"] = False
        selected[name] = entry
    for loss, spec in (distillation.get("losses") or {}).items():
        needs = spec.get("teacher") if isinstance(spec, dict) else None
        if needs and needs not in names:
            raise ConfigError(
                f"--teacher {','.join(names)} leaves teacher '{needs}' out, but distillation.losses.{loss} distils "
                f"from it; add it (--teacher {','.join([*names, needs])}) or remove that loss from {source}.")
    return selected


def _dataset_section(data: Dict[str, Any], name: str, source: str) -> Dict[str, Any]:
    if data.get("dataset") not in (None, name):
        raise ConfigError(
            f"--dataset {name} contradicts {source}, which sets data.dataset: {data['dataset']}; drop the flag, "
            f"or change data.dataset (and data.root) in the config.")
    out = {**data, "dataset": name}
    if "root" not in data:
        root = Path("datasets") / name
        if not resolve_path(root).is_dir():
            raise ConfigError(
                f"--dataset {name}: {root}/ does not exist. coco128 is built in; fetch others with "
                f"`bash scripts/download_datasets.sh {name}`, or set data.root=DIR to where it lives.")
        out["root"] = str(root)
    return out


def run_tool(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a tool's main; user mistakes print one clear message and exit 2, no traceback. SIGINT/SIGTERM
    stop it cleanly (utils/stop_signals.py): one line saying how to continue, exit 130/143."""
    setup_logging()
    try:
        with stop_signals():
            return main(argv)
    except Stopped as exc:
        get_logger().error("%s", exc)
        return exc.exit_code
    except USER_ERRORS as exc:
        get_logger().error("%s", exc)
        return 2
    except OSError as exc:
        if not (getattr(exc, "user_error", False) or exc.errno in DISK_ERRNOS):
            raise
        get_logger().error("%s", exc if getattr(exc, "user_error", False) else f"{exc} ({type(exc).__name__})")
        return 2
    except KeyboardInterrupt:
        get_logger().error("interrupted")
        return 130


def entry(main: Callable[[Optional[Sequence[str]]], int]) -> None:
    sys.exit(run_tool(main))
