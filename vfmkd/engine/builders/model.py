"""Builder of the student: ``model`` section -> :class:`UnifiedModel` (+ ``model.init``)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping, Union

from vfmkd.core.config import resolve_path
from vfmkd.core.config_schema import ModelConfig
from vfmkd.core.errors import ConfigError, did_you_mean
from vfmkd.engine.builders.data import head_classes
from vfmkd.models.unified_model import UnifiedModel
from vfmkd.tasks import canvas_stride_heads

INIT_KEYS = ("from", "parts", "strict")


def build_model(model: Union[ModelConfig, Mapping[str, Any]], initialise: bool = False,
                training: bool = False) -> UnifiedModel:
    """The student from the ``model`` section (its backbone, neck and head entries; DSRL's input scale).
    ``initialise``: load ``model.init`` (a training run that does not resume; tools that load a
    checkpoint of their own skip it); its report is kept in ``init_report``. ``training``: the trained
    path's input scale (the trainer), else the inference path's (``model.infer_scale``)."""
    if isinstance(model, ModelConfig):
        model = asdict(model)
    student = UnifiedModel.from_config(model, canvas_heads=canvas_stride_heads(head_classes(model.get("heads", {}))),
                                       training=training)
    init = dict(model.get("init") or {})
    unknown = [k for k in init if k not in INIT_KEYS]
    if unknown:
        raise ConfigError(f"model.init: unknown key '{unknown[0]}'.{did_you_mean(unknown[0], INIT_KEYS)} "
                          f"Keys: from (the file), parts (backbone/neck/heads), strict.")
    if initialise and init.get("from"):
        from vfmkd.models.pretrained import initialise_student

        student.init_report = initialise_student(student, str(resolve_path(init["from"])), init.get("parts"),
                                                 bool(init.get("strict", False)))
    return student
