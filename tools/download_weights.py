#!/usr/bin/env python
"""Download official teacher checkpoints into ``weights/`` and verify their sha256.

    python tools/download_weights.py --list
    python tools/download_weights.py --model sam_vit_b
    python tools/download_weights.py --all --dir /data/weights

The command (its flags, checks and messages) is vfmkd/engine/commands/download_weights.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`

from vfmkd.engine.commands.download_weights import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
