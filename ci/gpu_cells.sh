#!/usr/bin/env bash
# GPU-machine matrix cells: the cell runner on the machine's torch with transformers carried
# as wheels (.whl/<set>/ per version; .whl/llava_torch-*.whl). Results land in $OUT/<cell>.json.
# Each cell runs every runner stage: the tiny-model stages on the CPU, the full-size stage
# (LLaVA-1.5-7B architecture, random weights) on the GPU. The log goes to $OUT/<cell>.log.
# The transformers versions are envs/cells.toml [gpu]; a set name is the version without dots
# (`t` + the digits), and `bash ci/gpu_cells.sh` with no arguments runs them all plus `native`.
# Usage there: GPU_CELL_TIMEOUT=280 bash ci/gpu_cells.sh [t4372 t4573 t500 native]
set -u
export PYTHONUNBUFFERED=1
pip_install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$1" "${@:2}"; }
pip_install /tmp/llava .whl/llava_torch-*.whl || exit 1
sets=("$@")
if [ ${#sets[@]} -eq 0 ]; then
  mapfile -t sets < <(python3 -m dymu.matrix.cells gpu | sed 's/\.//g; s/^/t/')
  sets+=(native)
fi
for set in "${sets[@]}"; do
  site=/tmp/site-$set
  if [ "$set" != native ]; then pip_install "$site" .whl/"$set"/*.whl || { echo "cell gpu-$set: install failed"; continue; }; fi
  tf=$(PYTHONPATH=$site python3 -c "import transformers; print(transformers.__version__)" 2>"$OUT/import-$set.log") \
    || { echo "cell gpu-$set: transformers does not import (see import-$set.log)"; continue; }
  echo "== gpu cell: transformers $tf"
  PYTHONPATH=$site:/tmp/llava:. timeout "${GPU_CELL_TIMEOUT:-280}" python3 -m dymu.matrix.runner \
    --cell "gpu-tf$tf" --out "$OUT/gpu-tf$tf.json" > "$OUT/gpu-tf$tf.log" 2>&1
  grep -E "^cell " "$OUT/gpu-tf$tf.log" || echo "cell gpu-tf$tf: runner exited abnormally"
done
