#!/usr/bin/env python
"""Download every official teacher checkpoint (SAM, SAM2/SAM2.1, DINO, DINOv2) into ``weights/``.

    python tools/download_models.py --list                 # what there is, sizes, sha256, present or not
    python tools/download_models.py                        # all of them (about 19 GiB)
    python tools/download_models.py --family sam2          # one family

The command (its flags, checks and messages) is vfmkd/engine/commands/download_models.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.engine.commands.download_models import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
