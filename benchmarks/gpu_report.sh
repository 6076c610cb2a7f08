#!/usr/bin/env bash
# One-GPU throughput report (benchmarks/gpu_report.py's docstring), one command:
#   bash benchmarks/gpu_report.sh [--out gpu_report.md]          # CUDA: B/16, L/16, H/16 in < 8 min
#   bash benchmarks/gpu_report.sh --tiny   (or GPU_REPORT_TINY=1)  # CPU: the same code, tiny shape (CI)
# Installs nothing but the wheels in $GPU_REPORT_WHEELS (default shared/wheels), if any, with
# pip install --no-deps; a missing optional package (datasets: the loader row) is a note in the table.
# $PYTHON picks the interpreter (default python). A hard stop at $GPU_REPORT_WALL_S (480) seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WHEELS=${GPU_REPORT_WHEELS:-shared/wheels}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install --no-deps --quiet "$WHEELS"/*.whl \
    || echo "gpu_report: pip install --no-deps $WHEELS/*.whl failed; going on with what is installed" >&2
fi
if [ "${GPU_REPORT_TINY:-0}" = 1 ]; then
  set -- --tiny "$@"
fi
exec timeout -k 10 "${GPU_REPORT_WALL_S:-480}" "$PY" benchmarks/gpu_report.py "$@"
