"""Download official teacher checkpoints into ``weights/`` and verify their sha256.

    python tools/download_weights.py --list
    python tools/download_weights.py --model sam_vit_b
    python tools/download_weights.py --all --dir /data/weights

A file is streamed to ``<file>.part``, its sha256 checked against the pinned value, and only then
renamed into place, so an interrupted download never leaves a file that looks complete. Offline,
each file's URL, sha256 and destination are printed (fetch it elsewhere, copy it there) and the
tool exits 2. This module is the one implementation: ``tools/download_sam_weights.py`` and
``tools/download_models.py`` are entry points over :func:`download_all`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence

from tqdm import tqdm

from vfmkd.core import official_weights as weights_mod
from vfmkd.core.official_weights import OfficialWeights

_CHUNK = 1 << 20
_TIMEOUT_S = 30


EXIT_FAILED = 2  # a file could not be fetched or verified; the message names the next step


class DownloadError(Exception):
    """A download failed in a way the user can fix; the message says how. ``unreachable``: the
    server could not be reached at all (offline), so other files from it need not be tried."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _offline_hint(w: OfficialWeights, dest: Path) -> str:
    check = f"its sha256 must be {w.sha256}" if w.sha256 else "its sha256 is not pinned"
    return (
        f"on a machine with internet run `python tools/download_weights.py --model {w.name} "
        f"--dir {dest.parent}`, or download {w.url} ({check}) and copy it to {dest}"
    )


def manual_instructions(w: OfficialWeights, dest: Path) -> str:
    """What to do by hand when this machine cannot download ``w``: the URL, sha256 and destination."""
    return (f"{w.name}: fetch {w.url}\n    sha256 {w.sha256 or 'not pinned'}"
            f"{f', {w.size_bytes} bytes' if w.size_bytes else ''}\n    copy it to {dest}\n"
            f"    check: sha256sum {dest}")


def _verify(w: OfficialWeights, path: Path) -> Optional[bool]:
    """True/False when the sha256 is pinned, None when it is not (size is checked instead)."""
    if w.sha256 is None:
        return None if w.size_bytes is None else path.stat().st_size == w.size_bytes
    return _sha256(path) == w.sha256


def download(w: OfficialWeights, weights_dir: Path) -> Path:
    """Fetch ``w`` into ``weights_dir``; skip when an existing file verifies. Raises DownloadError."""
    dest = weights_dir / w.filename
    if dest.exists():
        ok = _verify(w, dest)
        if ok:
            print(f"{w.name}: {dest} already present, sha256 verified; skipping.")
            return dest
        if ok is None:
            print(f"{w.name}: {dest} already present (sha256 not pinned, not verified); skipping.")
            return dest
        print(f"{w.name}: {dest} exists but its sha256 does not match; downloading it again.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        _fetch(w, dest, part)
    except BaseException:
        part.unlink(missing_ok=True)  # never leave a half file behind, not even on Ctrl-C
        raise
    for name in w.companions:  # e.g. a Hugging Face folder's config.json beside its weights
        download(dataclasses.replace(w, name=f"{w.name} {name}", url=w.url.rsplit("/", 1)[0] + "/" + name,
                                     filename=str(Path(w.filename).parent / name), sha256=None, size_bytes=None,
                                     companions=()), weights_dir)
    return dest


def _request(url: str) -> urllib.request.Request:
    """The request for ``url``; Hugging Face downloads carry ``HF_TOKEN`` (gated releases need it)."""
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token and "huggingface.co" in url else {}
    return urllib.request.Request(url, headers=headers)


def _fetch(w: OfficialWeights, dest: Path, part: Path) -> None:
    digest = hashlib.sha256()
    try:
        response = urllib.request.urlopen(_request(w.url), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            page = w.url.split("/resolve/")[0]
            raise DownloadError(f"{w.url} refused the download (HTTP {err.code}): the release is gated; accept its "
                                f"licence at {page}, create a token at https://huggingface.co/settings/tokens and "
                                f"run again with HF_TOKEN=<token>, or {_offline_hint(w, dest)}.") from None
        raise DownloadError(f"{w.url} answered HTTP {err.code} ({err.reason}); {_offline_hint(w, dest)}.") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"could not reach {w.url} ({reason}); {_offline_hint(w, dest)}.",
                            unreachable=True) from None
    with response:
        total = response.headers.get("Content-Length") if response.headers else None
        total = int(total) if total else w.size_bytes
        try:
            with open(part, "wb") as out, tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=w.filename
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as err:
            raise DownloadError(
                f"download of {w.url} was interrupted ({err}); run the command again, or "
                f"{_offline_hint(w, dest)}."
            ) from None
    got = digest.hexdigest()
    if w.sha256 is None:
        print(f"{w.name}: WARNING: sha256 is not pinned for this file; it was not verified (got {got}).")
        if w.size_bytes is not None and part.stat().st_size != w.size_bytes:
            raise DownloadError(
                f"{w.url} gave {part.stat().st_size} bytes, expected {w.size_bytes}; the download is incomplete."
            )
    elif got != w.sha256:
        raise DownloadError(
            f"sha256 mismatch for {w.url}: expected {w.sha256}, got {got} "
            f"({part.stat().st_size} bytes). The download is corrupt or was altered; nothing was written "
            f"to {dest}. Run the command again, or {_offline_hint(w, dest)}."
        )
    os.replace(part, dest)
    print(f"{w.name}: saved {dest} (sha256 {'verified' if w.sha256 else 'not pinned'}).")


def _list(ws: Sequence[OfficialWeights], weights_dir: Path) -> None:
    for w in ws:
        size = f"{w.size_bytes / 2**20:.0f} MiB" if w.size_bytes else "size unknown"
        here = "present" if (weights_dir / w.filename).exists() else "missing"
        print(f"{w.name:<12} {w.filename:<24} {size:>10}  [{here}]  sha256={w.sha256 or 'not pinned'}")
        print(f"{'':<12} {w.url}")


def add_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", default="weights", type=Path,
        help="folder to store the files in (default: weights/, where the teachers look by default).",
    )


def build_parser() -> argparse.ArgumentParser:
    names = list(weights_mod.OFFICIAL_WEIGHTS)
    parser = argparse.ArgumentParser(
        prog="download_weights.py",
        description="Download official teacher checkpoints and verify their sha256 (exit 2 when one "
                    "cannot be fetched: offline, the URL, sha256 and destination of each are printed).",
    )
    parser.add_argument(
        "--model", action="extend", nargs="+", choices=names, default=[], metavar="NAME",
        help=f"checkpoint(s) to download; repeat or list several. Choices: {', '.join(names)}.",
    )
    parser.add_argument("--all", action="store_true", help="download every official checkpoint.")
    add_dir_argument(parser)
    parser.add_argument(
        "--list", action="store_true",
        help="list the known checkpoints (file, size, sha256, URL, present in --dir or not) and exit.",
    )
    return parser


def list_weights(ws: Sequence[OfficialWeights], weights_dir: Path) -> int:
    _list(ws, weights_dir)
    return 0


def download_all(ws: Sequence[OfficialWeights], weights_dir: Path) -> int:
    """Download each of ``ws`` into ``weights_dir``; 0 when all are there and verified, else 2.
    Once the server is unreachable (offline) the rest are not tried: for every file still missing
    the URL, sha256 and destination are printed, with the next step."""
    failed: List[OfficialWeights] = []
    offline = False
    for w in ws:
        if offline and not (weights_dir / w.filename).exists():
            failed.append(w)
            continue
        try:
            download(w, weights_dir)
        except DownloadError as err:
            print(f"error: {w.name}: {err}", file=sys.stderr)
            failed.append(w)
            offline = offline or err.unreachable
        except KeyboardInterrupt:
            print(f"\ninterrupted; {w.name} was not saved.", file=sys.stderr)
            return 130
    if not failed:
        return 0
    print(f"\n{len(failed)} of {len(ws)} checkpoint(s) are not in {weights_dir}"
          f"{' (this machine cannot reach the download server)' if offline else ''}. Next step: fetch them on a "
          f"machine with internet (or run this command again there) and copy them over:", file=sys.stderr)
    for w in failed:
        print("  " + manual_instructions(w, weights_dir / w.filename), file=sys.stderr)
    print("Or run without weights on the explicit random-init path: teacher.init=random "
          "(features are meaningless; for smoke tests).", file=sys.stderr)
    return EXIT_FAILED


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    table = weights_mod.OFFICIAL_WEIGHTS
    if args.list:
        return list_weights(list(table.values()), args.dir)
    names = list(table) if args.all else list(dict.fromkeys(args.model))
    if not names:
        parser.print_usage(sys.stderr)
        print("error: name at least one --model, or use --all / --list.", file=sys.stderr)
        return 2
    return download_all([table[n] for n in names], args.dir)

