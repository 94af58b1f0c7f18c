#!/usr/bin/env bash
# The one-shot GPU check: GPU tests, then kernel and end-to-end benchmarks, in about 10 minutes.
#
#   bash bench/gpu_check.sh [OUT_DIR]        (default: $OUT, else ./gpu_check_results)
#
# Needs a machine with an NVIDIA GPU and torch + triton installed; no network and
# no install of this package (it runs from the repository root). Each step has
# its own time limit so one slow step cannot eat the others' time; a step that
# fails or times out is recorded and the next one still runs. Everything lands
# in OUT_DIR: one log per step, the benchmark JSON/CSV/markdown/PNG files under
# bench/, summary.md, and all of it packed as gpu_check.tar.gz.
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_results}}"
mkdir -p "$out/bench"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FASTLM_BENCH_OUT="$out/bench"
unset TRITON_INTERPRET
summary="$out/summary.md"
{
  echo "# fastlm GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  python -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')" 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1
  echo
  echo "| step | seconds | result |"
  echo "|---|---|---|"
} > "$summary"

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  local result="ok"
  [ $rc -eq 124 ] && result="TIMED OUT" || { [ $rc -ne 0 ] && result="FAILED (exit $rc)"; }
  echo "| $name | $((SECONDS - start)) | $result |" >> "$summary"
  tail -n 3 "$out/$name.log"
}

step gpu-tests      140 python -m pytest tests -m gpu -k "not gluon" -q -x --no-header -p no:cacheprovider
# The experimental Gluon forward (FASTLM_ATTENTION=gluon, Hopper only; skipped elsewhere): its own
# step, so that a failure (or a hang: it has never run) there stops none of the other GPU tests;
# it compiles each of its 5 candidates per causal setting (11 kernels) and runs each once.
step gpu-gluon       40 python -m pytest tests/kernels/test_attention.py -m gpu -k gluon -q --no-header -p no:cacheprovider
step selfcheck       25 python -m kernels.selfcheck
step bench-norm      60 python -m bench.norm --hidden 2048,4096,8192
step bench-xent      80 python -m bench.cross_entropy --gpu --vocabs 32000,128256
# Attention: issue 16's figure, causal bf16 head dim 128 at 16k tokens (seq 4k and 16k),
# forward, backward and forward+backward against SDPA's flash, cuDNN and efficient
# backends. The score-materialising rows (sdpa-math, torch.compile) are left to the
# full `python -m bench.attention`: their compiles and 16k scores do not fit the limit.
# fastlm-gluon: the experimental Gluon forward's row (on Hopper; elsewhere a row that says why not), in
# the place of SDPA's efficient backend (the slowest of the three, which the issue's figure does not
# compare against): 25 s of this step's limit went to gpu-gluon.
step bench-attention 65 python -m bench.attention --seqlens 4096,16384 --causal yes --providers fastlm,fastlm-gluon,sdpa-flash,sdpa-cudnn
# Issue 17's figures: packed mixed lengths vs the same batch padded, a 4,096 window over 32k vs full causal.
step bench-varlen    35 python -m bench.attention --suite varlen
step bench-window    35 python -m bench.attention --suite window
step bench-rope      25 python -m bench.rope --seqlens 4096
step bench-glu       35 python -m bench.glu --ops swiglu,swiglu_packed --hidden 14336
step bench-train     60 python -m bench.train

{
  echo
  for f in "$out"/bench/*.md; do [ -f "$f" ] && { echo "## $(basename "$f" .md)"; echo; cat "$f"; echo; }; done
} >> "$summary"
tar -czf /tmp/gpu_check.tar.gz -C "$out" --exclude=gpu_check.tar.gz . && mv /tmp/gpu_check.tar.gz "$out/"
echo "results in $out (summary.md, gpu_check.tar.gz)"
