"""Builders: the only code that reads config dicts. Each unpacks one section into plain keyword
arguments of a component (detectron2's style: the components never see cfg)."""
from vfmkd.engine.builders.data import (
                                        box_classes_key,
                                        build_augment,
                                        build_dataset,
                                        check_head_classes,
                                        class_names,
                                        detection_classes,
                                        head_classes,
                                        head_tasks,
)
from vfmkd.engine.builders.losses import build_distiller, build_loss_terms, output_class_channels
from vfmkd.engine.builders.model import INIT_KEYS, build_model
from vfmkd.engine.builders.teachers import (
                                        LiveTeachers,
                                        build_router,
                                        enabled_teachers,
                                        open_cache,
                                        teacher_outputs,
                                        teacher_specs,
)

__all__ = ["INIT_KEYS", "LiveTeachers", "box_classes_key", "build_augment", "build_dataset",
           "build_distiller", "build_loss_terms", "build_model", "build_router", "check_head_classes", "class_names",
           "detection_classes",
           "enabled_teachers", "head_classes", "head_tasks", "open_cache", "output_class_channels", "teacher_outputs",
           "teacher_specs"]
