#!/usr/bin/env bash
# Installs vfmkd and its pinned dependencies into the current Python environment.
# torch + torchvision come from PyPI as a matching pair. Some machines carry a local CPU-only
# torch wheel in pip's find-links; torchvision's compiled ops break against it, so this script
# ignores local pip configuration and indexes while resolving (PyPI only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_pypi() { env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null "$PY" -m pip "$@"; }
if ! "$PY" - <<'PY' 2>/dev/null
import importlib.metadata as md, sys
want = {}
for line in open("requirements.txt"):
    line = line.split("#")[0].strip()
    if "==" in line:
        name, ver = line.split("==")
        want[name.strip()] = ver.strip()
for name, ver in want.items():
    have = md.version(name)
    if have.split("+")[0] != ver:
        sys.exit(1)
import torchvision.ops  # noqa: F401  (fails on a torch/torchvision mismatch)
PY
then
  pip_pypi install --quiet --disable-pip-version-check -r requirements.txt
fi
# Meta's sam2 (the SAM2 teacher) is an sdist whose build imports torch: build it against the torch
# installed above (--no-build-isolation; an isolated build would download a second torch), with its
# dependencies already pinned in requirements.txt (--no-deps) and without the optional CUDA extension.
# PyPI's sam2 is a third-party upload of Meta's code, so the sdist's sha256 is pinned too.
if ! "$PY" -c "import importlib.metadata as md, sys; sys.exit(md.version('sam2') != '1.1.0')" 2>/dev/null; then
  echo "sam2==1.1.0 --hash=sha256:7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74" |
    SAM2_BUILD_CUDA=0 pip_pypi install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
      --require-hashes -r /dev/stdin
fi
pip_pypi install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
"$PY" -c "import torch, torchvision.ops, segment_anything, sam2, ultralytics, h5py, omegaconf, torchmetrics, monai; print('vfmkd setup ok: torch', torch.__version__, 'torchvision', torchvision.__version__)"
