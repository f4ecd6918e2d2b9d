#!/usr/bin/env bash
# `make gpu-check` on a lent GPU machine that cannot fetch packages, in one call.
#
#   bash benchmarks/lent_gpu_check.sh --fetch   # here, with a network: the pinned peft, transformers and bitsandbytes
#                                               # wheels (requirements-dev.txt) for the machine's python 3.12 into .whl/
#   bash benchmarks/lent_gpu_check.sh           # there, from the repo root with .whl/ carried: install the wheels
#                                               # beside the image's CUDA torch and triton, build, run the check
#
# The machine's python3 holds CUDA torch and triton but not this project's pins of the others. Everything the check
# writes lands in $OUT (the lent machine's output folder; ./gpu-out-copy elsewhere): make.log, BENCHMARKS.md with its
# measured-GPU section, and gpu/ (the check's log, host profiles and the timing grid's results and route choices):
# eight files. About 100 s of build, then the check's steps under their limits: up to 150 s of tests with a cold
# Triton cache, 180 s of grid and 90 s of profiles, about 530 s in all: run it with the 600 s a call may take.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch" ]; then
  pins=$(grep -E '^(peft|transformers|bitsandbytes)==' requirements-dev.txt)
  mkdir -p .whl
  # shellcheck disable=SC2086  # one argument per pin
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $pins
fi

OUT=${OUT:-gpu-out-copy}
mkdir -p "$OUT"
ls .whl/*.whl >/dev/null 2>&1 || { echo "lent_gpu_check: no wheels in .whl/ (run it with --fetch first)"; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi -L
start=$(date +%s)
# A failed CUDA build must not cost the whole call: the check then runs without the cuda backend and says so.
if ! make install-into-python PY=python3 >"$OUT/make.log" 2>&1; then
  echo "lent_gpu_check: the build failed (see make.log); building without the CUDA extension"
  export FASTPEFT_SKIP_CUDA_BUILD=1
fi
echo "lent_gpu_check: built in $(( $(date +%s) - start )) s"
make gpu-check PY=python3 GPU_CHECK_ARGS="--out $OUT/gpu" >>"$OUT/make.log" 2>&1
status=$?
cp BENCHMARKS.md "$OUT/"
tail -5 "$OUT/make.log"
echo "lent_gpu_check: exit status $status after $(( $(date +%s) - start )) s"
exit $status
