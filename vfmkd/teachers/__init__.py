from vfmkd.teachers.base import BaseTeacher, TeacherBatch, TeacherFingerprint
from vfmkd.teachers.dino import DinoTeacher, Dinov2Teacher
from vfmkd.teachers.lora_sam import LoraSamTeacher
from vfmkd.teachers.sam import SamTeacher
from vfmkd.teachers.sam2 import Sam2Teacher  # imports Meta's sam2 (and its global Hydra) lazily, at build
from vfmkd.teachers.settings import TeacherSettings
from vfmkd.teachers.vfmkd_model import VfmkdTeacher  # a trained vfmkd run as a (live-only) teacher

__all__ = ["BaseTeacher", "DinoTeacher", "Dinov2Teacher", "LoraSamTeacher", "Sam2Teacher", "SamTeacher",
           "TeacherBatch", "TeacherFingerprint", "TeacherSettings", "VfmkdTeacher"]
