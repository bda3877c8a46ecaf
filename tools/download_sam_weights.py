#!/usr/bin/env python
"""Download the official SAM (segment-anything v1) checkpoint of a ViT size into ``weights/``.

    python tools/download_sam_weights.py --model vit_h        # = download_weights.py --model sam_vit_h
    python tools/download_sam_weights.py --model vit_b vit_l --dir /data/weights

The command (its flags, checks and messages) is vfmkd/engine/commands/download_sam_weights.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.engine.commands.download_sam_weights import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
