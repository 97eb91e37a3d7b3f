#!/usr/bin/env bash
# The GPU check of `--batched-devices` (issue 14), prepared to run in one go on a machine with a CUDA GPU:
#   bash qflare/bench/gpu_batched.sh           (from the repository root; about 2-4 minutes on an H200)
# 1. the batched-vs-loop equality tests, now also on CUDA (tests/test_training_batched.py);
# 2. `qflare bench batched-devices --device cuda --rounds 30`: fmnist-dir05 trained by the per-device loop,
#    then with --batched-devices, on the GPU; target: batched_rounds_s <= 5 with the loop's accuracy curve.
# Environment: PYTHON (default python3) must import torch with CUDA and QFLARE's dependencies;
# FMNIST_DIR, the Fashion-MNIST folder, when it is not in a usual place; OUT (default ./gpu-batched-out)
# receives tests.txt, batched_devices.json and env.txt.
set -euo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-./gpu-batched-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF' | tee "$OUT/env.txt"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_batched.sh: torch {torch.__version__} sees no CUDA device; nothing measured")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
PYEOF
data=()
if [[ -n "${FMNIST_DIR:-}" ]]; then data=(--data-root "$FMNIST_DIR"); fi
"$PY" -m pytest -q -p no:randomly tests/test_training_batched.py -k "equal_the_per_device_loop or cuda" 2>&1 \
    | tail -n 15 | tee "$OUT/tests.txt"
timeout 480 "$PY" -m qflare bench batched-devices --device cuda --rounds 30 --json "${data[@]}" \
    | tail -n 1 | tee "$OUT/batched_devices.json"
"$PY" - "$OUT/batched_devices.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"loop {r['loop_rounds_s']} s, batched {r['batched_rounds_s']} s for {r['rounds']} rounds "
      f"(x{r['speedup']}); target {r['target_rounds_s']} s met: {r['meets_target']}; "
      f"max accuracy gap {r['max_accuracy_gap']}")
PYEOF
