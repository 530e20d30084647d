#!/usr/bin/env bash
# The GPU re-check issue 12 still owes, in one command on the device machine (never run yet; each
# part is a few minutes, so together they may pass the 10-minute call limit: run them separately if
# so): the full-size float32 identity gate, the CUDA tests of the prefill graph, graph decode, K/V sink
# and tower, then the like-for-like memory bench (stock with and without its K/V sink against
# DyMU's) at batch 8 and 1. Reports go to $OUT (or ./gpu_recheck). Random full-size weights:
# timings and memory only. TAU=thresholds.safetensors skips calibrating on the generated images.
#
#     bash scripts/gpu_recheck.sh
set -u
export PYTHONPATH=.
out=${OUT:-gpu_recheck}
mkdir -p "$out"
nvidia-smi --query-gpu=name --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
status=0
python scripts/gpu_identity.py || status=1
cp -f identity_fp32.json "$out/" 2>/dev/null
python -m pytest -p no:cacheprovider -q -rs tests/test_prefill_graph.py tests/test_graph_decode.py \
  tests/test_kv_sink.py tests/test_tower_invariants.py || status=1
data=$(mktemp -d)
python scripts/variant_data.py "$data" --n 24 --prompt "Describe this image." > /dev/null || exit 1
bench=(python -m dymu bench --model-path random:llava-1.5-7b --device cuda --ignore-eos --no-plots
  --no-progress --data-file "$data/coco_variants.json")
if [ -n "${TAU:-}" ]; then bench+=(--thresholds "$TAU"); fi
"${bench[@]}" --batch-size 8 --warmup 1 --report-file "$out/stock_sink_b8.json" \
  --modes "dymu-c:decode=graph;sink=off,stock-g:decode=graph,dymu-g:decode=graph,stock-c:decode=graph;sink=off" \
  || status=1
"${bench[@]}" --batch-size 1 --limit 12 --warmup 2 --report-file "$out/stock_sink_b1.json" \
  --modes "stock-g:decode=graph,dymu-g:decode=graph" || status=1
exit $status
