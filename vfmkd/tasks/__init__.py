"""Tasks as components (layer 2): what a head is for. Importing this package registers the built-in
tasks in :data:`~vfmkd.core.registry.TASKS`; :func:`task_of` answers for a head."""
from vfmkd.tasks import binary, detection, instance, panoptic_query, promptable, semantic  # noqa: F401  (registers them)
from vfmkd.tasks.base import Task, canvas_stride_heads, get_task, label_kinds_of, task_of, tasks_of
from vfmkd.tasks.binary import BinaryOutput
from vfmkd.tasks.detection import DetectionOutput
from vfmkd.tasks.instance import InstanceOutput
from vfmkd.tasks.panoptic_query import QueryPanopticOutput
from vfmkd.tasks.promptable import PromptableOutput
from vfmkd.tasks.semantic import DenseOutput, DenseTask, SemanticOutput

__all__ = ["BinaryOutput", "DenseOutput", "DenseTask", "DetectionOutput", "InstanceOutput", "PromptableOutput",
           "QueryPanopticOutput", "SemanticOutput", "Task", "canvas_stride_heads", "get_task", "label_kinds_of",
           "task_of", "tasks_of"]
