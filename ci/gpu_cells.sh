#!/usr/bin/env bash
# GPU-machine matrix cells: the cell runner on the machine's torch with transformers carried
# as wheels (.whl/<set>/ per version; .whl/llava_torch-*.whl). Results land in $OUT/<cell>.json.
# Each cell runs every runner stage: the tiny-model stages on the CPU, the full-size stage
# (LLaVA-1.5-7B architecture, random weights) and `dymu bench` on random:llava-1.5-7b on the GPU.
# The transformers versions are envs/cells.toml [gpu]; a set name is the version without dots
# (`t` + the digits), and `bash ci/gpu_cells.sh` with no arguments runs them all plus `native`.
# Every set installs into a fresh directory, and the imported version must be the set's own.
# Cells run side by side, one GPU each (CUDA_VISIBLE_DEVICES), as many at once as the machine has
# GPUs (`nvidia-smi -L`) or GPU_CELL_JOBS says; logs and results stay per cell.
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
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
jobs=${GPU_CELL_JOBS:-$(( gpus > 0 ? gpus : 1 ))}
case "$jobs" in ''|*[!0-9]*|0) echo "gpu_cells: GPU_CELL_JOBS must be a positive number, got '$jobs'"; exit 2 ;; esac

run_set() {  # run_set SET GPU: install, check the version, run the cell on that GPU
  local set=$1 gpu=$2 site tf
  site=$(mktemp -d "/tmp/site-$set-XXXXXX")
  if [ "$set" != native ]; then pip_install "$site" .whl/"$set"/*.whl || { echo "cell gpu-$set: install failed"; return; }; fi
  tf=$(PYTHONPATH=$site python3 -c "import transformers; print(transformers.__version__)" 2>"$OUT/import-$set.log") \
    || { echo "cell gpu-$set: transformers does not import (see import-$set.log)"; return; }
  if [ "$set" != native ] && [ "t${tf//./}" != "$set" ]; then
    echo "cell gpu-$set: imported transformers $tf, not the set's version; refusing to run"; return
  fi
  echo "== gpu cell: transformers $tf on GPU $gpu"
  CUDA_VISIBLE_DEVICES=$gpu PYTHONPATH=$site:$llava:. timeout "${GPU_CELL_TIMEOUT:-280}" python3 -m dymu.matrix.runner \
    --cell "gpu-tf$tf" --out "$OUT/gpu-tf$tf.json" --backend gpu-machine > "$OUT/gpu-tf$tf.log" 2>&1
  grep -E "^cell " "$OUT/gpu-tf$tf.log" || echo "cell gpu-tf$tf: runner exited abnormally"
  rm -rf "$site"
}

declare -a slot_pid=()
for set in "${sets[@]}"; do
  free=""
  while [ -z "$free" ]; do  # the first GPU slot whose cell has finished (or never ran)
    for ((i = 0; i < jobs; i++)); do
      pid=${slot_pid[$i]:-}
      if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then free=$i; break; fi
    done
    [ -n "$free" ] || sleep 1
  done
  run_set "$set" "$free" &
  slot_pid[$free]=$!
done
wait
