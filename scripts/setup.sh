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
pip_pypi install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
"$PY" -c "import torch, torchvision.ops, segment_anything, ultralytics, h5py, omegaconf; print('vfmkd setup ok: torch', torch.__version__, 'torchvision', torchvision.__version__)"
