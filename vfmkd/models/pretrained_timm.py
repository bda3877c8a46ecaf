"""timm checkpoints (``.safetensors`` / ``.pth``, e.g. ImageNet weights) for the timm-based backbones:
ViT (``backbone.vit``), RepViT and RegNet (``backbone.body``, timm ``features_only`` trunks).

The state dict is picked and cleaned as timm's ``load_state_dict`` does (EMA weights first, ``module.``
stripped), passed through the family's own checkpoint filter (ViT: position embedding resampled to the
student's grid, other layouts converted; RegNet: pycls layouts), and the classifier named by timm's
``pretrained_cfg`` is dropped. A features_only trunk renames the model's top-level sequentials
(``stages.0`` -> ``stages_0``); the names follow timm's own ``_module_list``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import timm
import torch
from timm.models import clean_state_dict
from timm.models._features import _module_list
from torch import nn

from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.models.backbones.repvit import TimmFeaturesBackbone
from vfmkd.models.backbones.vit import ViTBackbone, resolve_variant
from vfmkd.models.pretrained import SourceTensors, key_prefixes
from vfmkd.utils.checkpoint import load_checkpoint

# Where the timm model families keep their checkpoint filter (passed to timm's builder as pretrained_filter_fn).
FILTER_NAMES = ("checkpoint_filter_fn", "_checkpoint_filter_fn", "_filter_fn")
STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's load_state_dict order


def read_timm_file(path: Path) -> Dict[str, Any]:
    """A ``.safetensors`` file (safetensors' reader: tensors only), else :func:`load_checkpoint`."""
    if path.suffix != ".safetensors":
        return load_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"model.init: checkpoint not found: {path} (absolute: {path.resolve()}); check the path.")
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise CheckpointError(
            f"model.init: {path} is truncated or not a safetensors file ({path.stat().st_size} "
            f"bytes; safetensors says: {str(err).splitlines()[0][:200]}); copy or download it again."
        ) from None


def select_timm_state(obj: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The state dict inside a timm checkpoint, chosen and cleaned as timm's ``load_state_dict`` does."""
    inner = next((obj[k] for k in STATE_KEYS if isinstance(obj.get(k), Mapping)), obj)
    state = {k: v for k, v in clean_state_dict(dict(inner)).items() if torch.is_tensor(v)}
    if not state:
        raise CheckpointError(f"model.init: the file holds no tensors (keys: {', '.join(map(str, list(obj)[:8]))}); "
                              "expected a state dict or a timm / vfmkd / ultralytics checkpoint")
    return state


def _family_filter(full: nn.Module) -> Optional[Callable]:
    module = sys.modules.get(type(full).__module__)
    return next((getattr(module, n) for n in FILTER_NAMES if callable(getattr(module, n, None))), None)


def _trunk(backbone: nn.Module) -> Optional[Tuple[nn.Module, str, nn.Module, Dict[str, str]]]:
    """(the timm module inside the backbone, its prefix in the student, the full timm model on the meta
    device, full-model module name -> trunk module name); None for a backbone that is not timm's."""
    if isinstance(backbone, ViTBackbone):
        vit = backbone.vit
        with torch.device("meta"):
            full = timm.create_model(resolve_variant(backbone.variant), pretrained=False,
                                     img_size=vit.patch_embed.img_size, in_chans=vit.patch_embed.proj.in_channels)
        names = {n: n for n, _ in full.named_children() if hasattr(vit, n)}
        return vit, "backbone.vit", full, names
    if isinstance(backbone, TimmFeaturesBackbone):
        body = backbone.body
        with torch.device("meta"):
            full = timm.create_model(backbone.timm_name, pretrained=False)
        children = {n for n, _ in body.named_children()}
        for flatten in (True, False):  # the trunk's names are one of timm's two listings
            listing = {old: new for new, old, _ in _module_list(full, flatten_sequential=flatten)}
            if children <= set(listing.values()):
                return body, "backbone.body", full, {o: n for o, n in listing.items() if n in children}
        raise ConfigError(f"model.init: cannot relate {backbone.timm_name}'s features_only trunk to its timm model")
    return None


def timm_source(obj: Mapping[str, Any], model: nn.Module, path: Path) -> SourceTensors:
    """The backbone tensors of a timm checkpoint (``obj``: the loaded file), named as in ``model``."""
    state = select_timm_state(obj)
    found = _trunk(model.backbone)
    if found is None:
        raise CheckpointError(
            f"model.init: {path} is a plain state dict of {key_prefixes(list(state), depth=2)}: not an ultralytics "
            f"YOLOv8 checkpoint or a vfmkd run, and timm files fit vit/repvit/regnet backbones only (the student's is "
            f"{type(model.backbone).__name__}); a checkpoint of another model family cannot initialise it")
    trunk, prefix, full, names = found
    filter_fn = _family_filter(full)
    if filter_fn is not None:
        try:
            try:
                state = filter_fn(state, trunk if prefix == "backbone.vit" else full)
            except TypeError:  # filters of the older form take the state dict alone
                state = filter_fn(state)
        except Exception as err:
            raise CheckpointError(f"model.init: timm's checkpoint filter of {type(full).__name__} cannot read {path} "
                                  f"({type(err).__name__}: {str(err)[:160]}); the file holds "
                                  f"{key_prefixes(list(state))}"
                                  ) from None
    classifier = full.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    tensors: Dict[str, torch.Tensor] = {}
    unplaced: List[str] = []
    dropped: List[str] = []
    full_keys, trunk_keys = set(full.state_dict()), set(trunk.state_dict())
    for key, value in state.items():
        if any(key in (f"{c}.weight", f"{c}.bias") for c in classifier):
            dropped.append(key)
            continue
        owner = next((o for o in sorted(names, key=len, reverse=True) if key.startswith(o + ".")), None)
        if "." not in key and key in trunk_keys:  # the model's own tensors (ViT's cls_token, pos_embed)
            tensors[f"{prefix}.{key}"] = value
        elif owner is not None:
            tensors[f"{prefix}.{names[owner]}{key[len(owner):]}"] = value
        elif key in full_keys:  # a layer the student's trunk leaves out (after its deepest level, the head)
            dropped.append(key)
        else:
            unplaced.append(key)
    rest = [f"backbone.{n}" for n,
            m in model.backbone.named_children() if m is not trunk and any(True for _ in m.parameters())]
    notes = [f"{', '.join(rest)}: vfmkd's own layers, not in a timm file (kept as initialised)"] if rest else []
    return SourceTensors(f"timm {type(full).__name__}", tensors, ("backbone",), unplaced, dropped, notes,
                         (prefix + ".",))

