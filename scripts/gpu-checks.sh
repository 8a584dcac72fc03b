#!/usr/bin/env bash
# The checks of a GPU lease (the device tool), one prepared command per call:
#   scripts/gpu-checks.sh tests              the CUDA equality and runtime tests (ZOO_TEST_DEVICE=cuda)
#   scripts/gpu-checks.sh scale BASE DATA    `zoo bench --suite scale` on one base (resnet-mnist or
#                                            tv-resnet18-64) with the demo zoo in DATA; the doc block
#                                            is written to $OUT/scale-BASE.md (docs/benchmarks-gpu.md)
#   scripts/gpu-checks.sh lease DATA         one lease's call: the tests, then scale on each base, each
#                                            within its share of time, logs in $OUT/NAME.log
# The device image has PyTorch but not this project's web stack: wheels for Python 3.12 travel in
# .whl/ (see docs/benchmarks-gpu.md for how they were fetched).
set -uo pipefail
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
case "${1:-}" in
  tests)
    ZOO_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -m "not postgres and not redis" tests/unit/test_mixed_batches.py \
      tests/api/test_runtime.py tests/api/test_channel.py tests/unit/test_methods.py ;;
  scale)
    work=$(mktemp -d) && cp -r "$3"/. "$work"/ || exit 1
    ZOO_BENCH_SCALE_BASES="$2" ZOO_DATA_DIR="$work" python3 -m service.cli bench --suite scale \
      --out "${OUT:-/tmp}/scale-$2.md" ;;
  lease)
    step() {  # NAME SECONDS ARGS...: this script with ARGS, cut after SECONDS; its servers stopped after
      local name=$1 t=$2; shift 2
      echo "start $(date +%s)" > "$OUT/$name.log"
      timeout -k 5 "$t" bash "$0" "$@" >> "$OUT/$name.log" 2>&1
      echo "rc $? end $(date +%s)" >> "$OUT/$name.log"
      pkill -f "[s]ervice[.]cli serve"; pkill -f "[b]ench[.]loadgen"; sleep 1  # brackets: not this line
    }
    step tests 60 tests
    step scale-resnet-mnist 290 scale resnet-mnist "$2"
    step scale-tv-resnet18-64 220 scale tv-resnet18-64 "$2"
    tail -n 3 "$OUT"/*.log ;;
  *) echo "usage: $0 tests | scale BASE DATA_DIR | lease DATA_DIR" >&2; exit 2 ;;
esac
