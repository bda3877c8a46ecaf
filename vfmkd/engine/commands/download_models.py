"""Download every official teacher checkpoint (SAM, SAM2/SAM2.1, DINO, DINOv2) into ``weights/``.

    python tools/download_models.py --list                 # what there is, sizes, sha256, present or not
    python tools/download_models.py                        # all of them (about 19 GiB)
    python tools/download_models.py --family sam2          # one family

The design document's name for ``tools/download_weights.py --all``; the download, the sha256 check
and the offline instructions (exit 2) are that tool's
(vfmkd/engine/commands/download_weights.py).
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from vfmkd.engine.commands import download_weights
from vfmkd.engine.commands.download_weights import weights_mod


def main(argv: Optional[List[str]] = None) -> int:
    table = weights_mod.OFFICIAL_WEIGHTS
    families = list(dict.fromkeys(w.family for w in table.values()))
    parser = argparse.ArgumentParser(
        prog="download_models.py",
        description="Download all official teacher checkpoints and verify their sha256; offline it prints each "
                    "file's URL, sha256 and destination and exits 2.")
    parser.add_argument("--family", nargs="+", choices=families, default=families, metavar="FAMILY",
                        help=f"only these families: {', '.join(families)} (default: all)")
    parser.add_argument(
        "--list", action="store_true", help="list the checkpoints (size, sha256, URL, present or not) and exit"
    )
    download_weights.add_dir_argument(parser)
    args = parser.parse_args(argv)
    chosen = [w for w in table.values() if w.family in args.family]
    if args.list:
        return download_weights.list_weights(chosen, args.dir)
    return download_weights.download_all(chosen, args.dir)

