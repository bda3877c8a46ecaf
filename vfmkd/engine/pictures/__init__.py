"""Pictures people would rather see than read: per-epoch panels, teacher-vs-student predictions,
feature PCA, panoptic overlays."""
