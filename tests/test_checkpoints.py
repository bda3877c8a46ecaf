"""The safe checkpoint loader, the official weights table and tools/download_weights.py."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from vfmkd.core import official_weights as weights_mod
from vfmkd.core.errors import CheckpointError, ConfigError
from vfmkd.core.official_weights import OFFICIAL_WEIGHTS, default_checkpoint_path, weights_for
from vfmkd.utils.checkpoint import load_checkpoint, sha256_of_file, unwrap_state_dict

REPO = Path(__file__).resolve().parents[1]
HINT = "python tools/download_weights.py --model sam_vit_b"


@pytest.fixture(scope="module")
def dl():
    from vfmkd.engine.commands import download_weights

    return download_weights


# ----------------------------------------------------------------------------- load_checkpoint
def test_load_plain_state_dict(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "a.bias": torch.zeros(3)}
    torch.save(sd, tmp_path / "ok.pth")
    out = load_checkpoint(tmp_path / "ok.pth")
    assert out.keys() == sd.keys() and torch.equal(out["a.weight"], sd["a.weight"])


def test_missing_file_names_the_download_command(tmp_path):
    with pytest.raises(CheckpointError, match="not found") as err:
        load_checkpoint(tmp_path / "sam_vit_b_01ec64.pth", download_hint=HINT)
    assert HINT in str(err.value)
    with pytest.raises(CheckpointError, match="check the path"):
        load_checkpoint(tmp_path / "other.pth")


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, legacy):
    full = tmp_path / "full.pth"
    torch.save({"w": torch.randn(256, 256)}, full, _use_new_zipfile_serialization=not legacy)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(cut, download_hint=HINT)
    msg = str(err.value)
    assert "truncated or corrupt" in msg and f"{cut.stat().st_size} bytes" in msg
    assert "re-download" in msg and HINT in msg


def test_empty_file_is_corrupt(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "empty.pth")


class Gadget:
    """Stands for any pickled Python object inside a checkpoint."""

    def __init__(self):
        self.armed = True

    def __setstate__(self, state):  # would run if the file were unpickled unsafely
        TRIGGERED.append(state)


TRIGGERED: list = []


def test_pickle_payload_is_refused_and_never_unpickled(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "cfg": Gadget()}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "refused" in msg and "pickled Python objects" in msg and "Gadget" in msg
    assert "never loads such files unsafely" in msg
    assert "torch.save(" in msg and ".state_dict.pth" in msg  # how to re-save a plain state_dict
    assert TRIGGERED == []


def test_non_dict_checkpoint(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(tmp_path / "t.pth")


# ----------------------------------------------------------------------------- unwrap / sha256
def test_unwrap_state_dict_wrappers():
    sd = {"x.weight": torch.ones(2)}
    assert unwrap_state_dict(sd) == sd
    assert unwrap_state_dict({"model": sd, "epoch": 3}) == sd  # SAM2 layout
    assert unwrap_state_dict({"state_dict": sd, "optimizer": {"lr": 1}}) == sd
    assert list(unwrap_state_dict({"module.x.weight": torch.ones(2)})) == ["x.weight"]
    with pytest.raises(CheckpointError, match="not a state_dict"):
        unwrap_state_dict({"epoch": 3, "cfg": "x"})


def test_sha256_is_streamed_and_memoised(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"a" * 3_000_000)
    assert sha256_of_file(path) == hashlib.sha256(b"a" * 3_000_000).hexdigest()
    st = path.stat()
    path.write_bytes(b"b" * 3_000_000)  # same size, mtime restored: the memo answers
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_of_file(path) == hashlib.sha256(b"a" * 3_000_000).hexdigest()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # changed file: re-hashed
    assert sha256_of_file(path) == hashlib.sha256(b"b" * 3_000_000).hexdigest()


# ----------------------------------------------------------------------------- weights table
def test_official_weights_table():
    sam = {k: w for k, w in OFFICIAL_WEIGHTS.items() if w.family == "sam"}
    assert set(sam) == {"sam_vit_b", "sam_vit_l", "sam_vit_h"}
    for w in sam.values():
        assert w.url == f"https://dl.fbaipublicfiles.com/segment_anything/{w.filename}"
        assert len(w.sha256) == 64 and int(w.sha256, 16) >= 0 and w.size_bytes > 0
    assert weights_for("sam", "vit_l").filename == "sam_vit_l_0b3195.pth"
    assert default_checkpoint_path("sam_vit_h") == Path("weights/sam_vit_h_4b8939.pth")
    with pytest.raises(ConfigError, match="vit_b"):
        weights_for("sam", "vit_bb")
    with pytest.raises(dataclasses.FrozenInstanceError):
        OFFICIAL_WEIGHTS["sam_vit_b"].sha256 = "x"


# ----------------------------------------------------------------------------- download_weights.py
def test_help_and_list(dl, capsys):
    with pytest.raises(SystemExit) as exit_:
        dl.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--all", "--dir", "--list"):
        assert flag in out
    assert dl.main(["--list"]) == 0
    out = capsys.readouterr().out
    for w in OFFICIAL_WEIGHTS.values():
        assert w.name in out and w.filename in out and (w.sha256 or "not pinned") in out
    assert dl.main([]) == 2


def test_offline_download_fails_cleanly(dl, tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    # offline: exit 2, naming the next step
    assert dl.main(["--model", "sam_vit_b", "--dir", str(tmp_path / "weights")]) == 2
    err = capsys.readouterr().err
    w = OFFICIAL_WEIGHTS["sam_vit_b"]
    assert "could not reach" in err and w.url in err and "Temporary failure" in err
    assert str(tmp_path / "weights" / w.filename) in err and "Traceback" not in err
    assert not list((tmp_path / "weights").glob("*"))


def test_download_verifies_sha256(dl, tmp_path, monkeypatch, capsys):
    payload = os.urandom(300_000)
    src = tmp_path / "served.pth"
    src.write_bytes(payload)
    good = hashlib.sha256(payload).hexdigest()
    base = dataclasses.replace(OFFICIAL_WEIGHTS["sam_vit_b"], url=src.as_uri(), size_bytes=len(payload))
    out_dir = tmp_path / "weights"
    dest = out_dir / base.filename

    monkeypatch.setitem(weights_mod.OFFICIAL_WEIGHTS, "sam_vit_b", dataclasses.replace(base, sha256="0" * 64))
    assert dl.main(["--model", "sam_vit_b", "--dir", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and good in err
    assert not dest.exists() and not list(out_dir.glob("*.part"))

    monkeypatch.setitem(weights_mod.OFFICIAL_WEIGHTS, "sam_vit_b", dataclasses.replace(base, sha256=good))
    assert dl.main(["--model", "sam_vit_b", "--dir", str(out_dir)]) == 0
    assert dest.read_bytes() == payload and not list(out_dir.glob("*.part"))

    # a verified file is not fetched again (no network needed)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("should not download"))
    capsys.readouterr()
    assert dl.main(["--model", "sam_vit_b", "--dir", str(out_dir)]) == 0
    assert "already present" in capsys.readouterr().out


def test_download_into_a_subfolder_with_its_companion_files_and_a_gated_release(dl, tmp_path, monkeypatch, capsys):
    # a Hugging Face folder release (sam3: sam3/model.safetensors + config.json beside it)
    served = tmp_path / "served"
    served.mkdir()
    (served / "model.safetensors").write_bytes(b"weights")
    (served / "config.json").write_text('{"model_type": "sam3_video"}')
    official = OFFICIAL_WEIGHTS["sam3"]
    w = dataclasses.replace(official, url=(served / "model.safetensors").as_uri())
    monkeypatch.setitem(weights_mod.OFFICIAL_WEIGHTS, "sam3", w)
    assert dl.main(["--model", "sam3", "--dir", str(tmp_path / "weights")]) == 0
    folder = tmp_path / "weights" / "sam3"
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert (folder / "config.json").read_text() == '{"model_type": "sam3_video"}'

    def gated(request, **kwargs):
        assert request.get_header("Authorization") == "Bearer hf_test"
        raise urllib.error.HTTPError(request.full_url, 401, "Unauthorized", {}, None)

    monkeypatch.setitem(weights_mod.OFFICIAL_WEIGHTS, "sam3", official)
    monkeypatch.setattr(urllib.request, "urlopen", gated)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    capsys.readouterr()
    assert dl.main(["--model", "sam3", "--dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "gated" in err and "https://huggingface.co/facebook/sam3" in err and "HF_TOKEN" in err
