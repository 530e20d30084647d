#!/usr/bin/env bash
# GPU-machine matrix cells: the cell runner on the machine's torch with transformers carried
# as wheels (.whl/<set>/ per version; .whl/llava_torch-*.whl). Results land in $OUT/<cell>.json.
# Each cell runs every runner stage: the tiny-model stages on the CPU, the full-size stage
# (LLaVA-1.5-7B architecture, random weights) and `dymu bench` on random:llava-1.5-7b on the GPU.
# The transformers versions are envs/cells.toml [gpu]; a set name is the version without dots
# (`t` + the digits), and `bash ci/gpu_cells.sh` with no arguments runs them all plus `native`.
# Every set installs into a fresh directory, and the imported version must be the set's own.
# Usage there: GPU_CELL_TIMEOUT=280 bash ci/gpu_cells.sh [t4372 t4573 t500 native]
set -u
export PYTHONUNBUFFERED=1
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$1" "${@:2}"; }
llava=$(mktemp -d /tmp/llava-XXXXXX)
pip_install "$llava" .whl/llava_torch-*.whl || exit 1
sets=("$@")
if [ ${#sets[@]} -eq 0 ]; then
  mapfile -t sets < <(python3 -m dymu.matrix.cells gpu | sed 's/\.//g; s/^/t/')
  sets+=(native)
fi
for set in "${sets[@]}"; do
  site=$(mktemp -d "/tmp/site-$set-XXXXXX")
  if [ "$set" != native ]; then pip_install "$site" .whl/"$set"/*.whl || { echo "cell gpu-$set: install failed"; continue; }; fi
  tf=$(PYTHONPATH=$site python3 -c "import transformers; print(transformers.__version__)" 2>"$OUT/import-$set.log") \
    || { echo "cell gpu-$set: transformers does not import (see import-$set.log)"; continue; }
  if [ "$set" != native ] && [ "t${tf//./}" != "$set" ]; then
    echo "cell gpu-$set: imported transformers $tf, not the set's version; refusing to run"; continue
  fi
  echo "== gpu cell: transformers $tf"
  PYTHONPATH=$site:$llava:. timeout "${GPU_CELL_TIMEOUT:-280}" python3 -m dymu.matrix.runner \
    --cell "gpu-tf$tf" --out "$OUT/gpu-tf$tf.json" --backend gpu-machine > "$OUT/gpu-tf$tf.log" 2>&1
  grep -E "^cell " "$OUT/gpu-tf$tf.log" || echo "cell gpu-tf$tf: runner exited abnormally"
  rm -rf "$site"
done
