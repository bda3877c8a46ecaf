"""The design document's helper commands, offline: each works, or exits 2 naming the next step
(the URL and checksum to fetch elsewhere and where to put the file). Nothing is downloaded: the
Python tools get an unreachable server, the shell scripts an unreachable proxy."""
from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vfmkd.core.official_weights import OFFICIAL_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
from vfmkd.engine.commands import download_models, download_sam_weights  # noqa: E402

# Any proxy-honouring client (curl, wget, urllib) fails at once: connection refused on port 9.
OFFLINE_ENV = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


@pytest.fixture
def offline(monkeypatch):
    calls = []

    def unreachable(url, *args, **kwargs):
        calls.append(getattr(url, "full_url", url))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    return calls


def _says_how_to_fetch(text: str, name: str, weights_dir: Path) -> None:
    w = OFFICIAL_WEIGHTS[name]
    assert w.url in text and w.sha256 in text and str(weights_dir / w.filename) in text, text


def test_download_sam_weights_vit_h_offline(offline, tmp_path, capsys):
    assert download_sam_weights.main(["--model", "vit_h", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert offline == [OFFICIAL_WEIGHTS["sam_vit_h"].url]  # vit_h means sam_vit_h
    _says_how_to_fetch(err, "sam_vit_h", tmp_path)
    assert "Next step" in err and "teacher.init=random" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_download_sam_weights_skips_a_present_file(tmp_path, monkeypatch, capsys):
    w = OFFICIAL_WEIGHTS["sam_vit_b"]
    monkeypatch.setattr(download_sam_weights.weights_mod, "OFFICIAL_WEIGHTS",
                        {**OFFICIAL_WEIGHTS, "sam_vit_b": type(w)(**{**w.__dict__, "sha256": None, "size_bytes": 3})})
    (tmp_path / w.filename).write_bytes(b"abc")
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("must not download"))
    assert download_sam_weights.main(["--dir", str(tmp_path)]) == 0  # default --model vit_b
    assert "already present" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        download_sam_weights.main(["--model", "sam_vit_h"])
    assert exit_.value.code == 2  # argparse: the sizes are vit_b, vit_l, vit_h


def test_download_models_offline_lists_every_checkpoint_once(offline, tmp_path, capsys):
    assert download_models.main(["--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(offline) == 1, "after the server proved unreachable the other files must not be tried"
    for w in OFFICIAL_WEIGHTS.values():
        assert w.url in err and str(tmp_path / w.filename) in err
        if w.sha256:
            assert w.sha256 in err
    assert f"{len(OFFICIAL_WEIGHTS)} of {len(OFFICIAL_WEIGHTS)} checkpoint(s) are not in" in err


def test_download_models_list_and_family(tmp_path, capsys):
    assert download_models.main(["--list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(w.filename in out for w in OFFICIAL_WEIGHTS.values()) and "[missing]" in out
    assert download_models.main(["--list", "--family", "sam2"]) == 0
    out = capsys.readouterr().out
    assert "sam2.1_hiera_base_plus.pt" in out and "sam_vit_b_01ec64.pth" not in out


def _bash(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=REPO, env=env or OFFLINE_ENV, capture_output=True, text=True,
                          timeout=120)


def test_download_datasets_says_coco128_is_built_in():
    result = _bash("scripts/download_datasets.sh")
    assert result.returncode == 0, result.stderr
    assert "coco128 is built in: datasets/coco128 (128 train2017 + 128 val2017 images" in result.stdout
    assert "bash scripts/download_datasets.sh coco2017" in result.stdout


def test_download_datasets_coco2017_offline(tmp_path):
    result = _bash("scripts/download_datasets.sh", "coco2017", "--dir", str(tmp_path / "coco2017"))
    assert result.returncode == 2
    err = result.stderr
    assert "cannot reach http://images.cocodataset.org" in err and "run this command again" in err
    for url, md5 in [("zips/train2017.zip", "cced6f7f71b7629ddf16f17bbcfab6b2"),
                     ("zips/val2017.zip", "442b8da7639aecaf257c1dceb8ba8c80"),
                     ("annotations/annotations_trainval2017.zip", "f4bbac642086de4f52a3fdda2de5fa2c")]:
        assert f"http://images.cocodataset.org/{url}" in err and md5 in err
    assert f"-> {tmp_path / 'coco2017' / 'downloads'}/train2017.zip" in err
    assert not list((tmp_path / "coco2017" / "downloads").iterdir())  # nothing half-written
    bad = _bash("scripts/download_datasets.sh", "voc")
    assert bad.returncode == 2 and "unknown dataset 'voc'" in bad.stderr


def test_setup_env_reports_the_machine_and_the_next_step():
    result = _bash("scripts/setup_env.sh", "--check")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch" in out and "CPU cores:" in out and "128 train2017 + 128 val2017" in out
    assert "next     " in out
    if not (REPO / "weights" / OFFICIAL_WEIGHTS["sam_vit_b"].filename).is_file():
        assert "python tools/download_sam_weights.py --model vit_b" in out and "teacher.init=random" in out
    bad = _bash("scripts/setup_env.sh", "--bogus")
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
