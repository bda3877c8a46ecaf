from vfmkd.teachers.base import BaseTeacher, TeacherBatch, TeacherFingerprint
from vfmkd.teachers.sam import SamTeacher
