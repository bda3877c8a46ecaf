from vfmkd.teachers.base import BaseTeacher, TeacherBatch, TeacherFingerprint
from vfmkd.teachers.dino_teacher import DinoTeacher, Dinov2Teacher
from vfmkd.teachers.dinov3_teacher import Dinov3ConvNextTeacher, Dinov3Teacher
from vfmkd.teachers.lora_sam_teacher import LoraSamTeacher
from vfmkd.teachers.pe_teacher import PeCoreTeacher
from vfmkd.teachers.radio_teacher import RadioTeacher
from vfmkd.teachers.sam2_teacher import Sam2Teacher  # imports Meta's sam2 (and its global Hydra) lazily, at build
from vfmkd.teachers.sam3_teacher import Sam3Teacher  # imports transformers lazily, at build
from vfmkd.teachers.sam_teacher import SamTeacher
from vfmkd.teachers.settings import TeacherSettings

__all__ = ["BaseTeacher", "DinoTeacher", "Dinov2Teacher", "Dinov3ConvNextTeacher", "Dinov3Teacher", "LoraSamTeacher",
           "PeCoreTeacher", "RadioTeacher", "Sam2Teacher", "Sam3Teacher", "SamTeacher",
           "TeacherBatch", "TeacherFingerprint", "TeacherSettings"]
