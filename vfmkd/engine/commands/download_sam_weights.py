"""Download the official SAM (segment-anything v1) checkpoint of a ViT size into ``weights/``.

    python tools/download_sam_weights.py --model vit_h        # = download_weights.py --model sam_vit_h
    python tools/download_sam_weights.py --model vit_b vit_l --dir /data/weights

The design document's name for ``tools/download_weights.py --model sam_<size>``; the download,
the sha256 check and the offline instructions (exit 2) are that tool's
(vfmkd/engine/commands/download_weights.py).
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from vfmkd.engine.commands import download_weights
from vfmkd.engine.commands.download_weights import weights_mod

SAM_FAMILY = "sam"


def sam_variants() -> List[str]:
    return [w.variant for w in weights_mod.OFFICIAL_WEIGHTS.values() if w.family == SAM_FAMILY]


def main(argv: Optional[List[str]] = None) -> int:
    variants = sam_variants()
    parser = argparse.ArgumentParser(
        prog="download_sam_weights.py",
        description="Download official SAM checkpoints (vit_b/vit_l/vit_h) and verify their sha256; offline it "
                    "prints each file's URL, sha256 and destination and exits 2.")
    parser.add_argument("--model", nargs="+", choices=variants, default=["vit_b"], metavar="SIZE",
                        help=f"SAM size(s): {', '.join(variants)} (default: vit_b, the main job's teacher)")
    download_weights.add_dir_argument(parser)
    args = parser.parse_args(argv)
    table = weights_mod.OFFICIAL_WEIGHTS
    return download_weights.download_all([table[f"{SAM_FAMILY}_{v}"] for v in dict.fromkeys(args.model)], args.dir)

