"""Student models: backbones, necks, heads and the unified model that joins them."""
from vfmkd.models.unified_model import StudentOutput, UnifiedModel

__all__ = ["StudentOutput", "UnifiedModel"]
