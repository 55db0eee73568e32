#!/usr/bin/env bash
# Everything worth running on a CUDA GPU, in one command: versions, the GPU tests, the benchmarks, the host-overhead
# and profile scripts, one JSON report, and a summary table printed last (so the tail of the output is enough).
# Usage, from the repo root: bash bench/gpu_check.sh
# Each stage stops at its time limit (GPU_CHECK_*_S below): with the defaults the stages take 470 s, startup and
# the report about 15 s, so a run takes about 8.1 minutes, whatever the card (a faster card just finishes more of
# each stage). A stage at its limit gets SIGINT first, so pytest still writes its results, then a kill after a
# grace (10 s, 30 s for the xdist stage, 5 s for scripts): at worst about 590 s, under the device's 10 minutes.
# Writes bench/results/gpu_report_<card>.json; with $OUT set (a folder to collect the results from, e.g. on a
# remote machine that returns at most 8 files), five files there: gpu_report.json, stages.log (every stage's
# output, written as it runs), bench_rows.jsonl and memory.json (rows as measured), logs.tar.gz (per-stage logs,
# junit xml and pytest-benchmark JSON, packed at the end).
set -uo pipefail  # no -e: a failing test stage must not cost us the benchmarks or the report
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# Never put the cwd (the repo root) on sys.path, in pytest-xdist workers too: the top-level kernels/ directory
# would shadow Hugging Face's `kernels` package, which transformers and bitsandbytes probe.
export PYTHONSAFEPATH=1
PY=python3
LOGS=$(mktemp -d /tmp/pf_gpu_check.XXXXXX)
T0=$(date +%s)

# Wheels put in .whl/ for an offline machine (carry .whl there): bitsandbytes for the QLoRA baselines, Liger-Kernel
# for the fused decoder's liger backend. To fill it: pip download --no-deps --only-binary=:all: --python-version 3.11
#   --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2 liger-kernel==0.8.5
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# peft_fast is not installed there: rebuild the installed layout (peft_fast.kernels = repo/kernels) in /tmp.
PKG=/tmp/pfpkg
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r peft_fast "$PKG/peft_fast" && rm -rf "$PKG/peft_fast/kernels" && cp -r kernels "$PKG/peft_fast/kernels"
export PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}  # no trailing ":" (= the cwd)

echo "== environment"
nvidia-smi
$PY - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
for name in ("triton", "transformers", "peft", "pytest", "pytest_benchmark", "bitsandbytes"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:
        print(f"{name}: not available ({type(e).__name__}: {e})"
              + ("  -> the PEFT + bitsandbytes QLoRA baseline will be skipped" if name == "bitsandbytes" else ""))
import peft_fast, peft_fast.kernels
print("peft_fast", peft_fast.__version__, "from", peft_fast.__file__, "| kernels from", peft_fast.kernels.__file__)
EOF

# Per-test limit when pytest-timeout is there, so one hung test does not eat the stage's whole budget.
TEST_TIMEOUT=""
$PY -c "import pytest_timeout" 2>/dev/null && TEST_TIMEOUT="--timeout=90"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"

stage() {  # stage NAME SECONDS pytest-args...: log, junit xml and "rc seconds" under $LOGS; 0 seconds = skip
  local name=$1 limit=$2 start
  shift 2
  if [ "$limit" -le 0 ] || ! picked "$name"; then echo "== $name: skipped"; : >"$LOGS/$name.skipped"; return; fi
  start=$(date +%s)
  # The log also goes straight to $OUT, so it is there even if the machine goes away mid-stage.
  echo "== $name: pytest $* (limit ${limit}s)" | tee -a "$LOGS/$name.log" ${OUT:+"$OUT/stages.log"}
  # SIGINT at the limit: pytest stops as on Ctrl-C and still writes the junit xml and the benchmark JSON (xdist's
  # controller waits up to 10 s for its workers first: that stage gets a longer grace, GRACE).
  timeout -s INT -k "${GRACE:-10}" "$limit" $PY -m pytest "$@" -p no:cacheprovider --junitxml="$LOGS/$name.xml" \
    2>&1 | tee -a "$LOGS/$name.log" ${OUT:+"$OUT/stages.log"}
  echo "${PIPESTATUS[0]} $(( $(date +%s) - start ))" >"$LOGS/$name.rc"
}
script() {  # script NAME SECONDS command...: a stage that runs a script (no junit xml; its rows go to its JSON)
  local name=$1 limit=$2 start
  shift 2
  if [ "$limit" -le 0 ] || ! picked "$name"; then echo "== $name: skipped"; : >"$LOGS/$name.skipped"; return; fi
  start=$(date +%s)
  echo "== $name: $* (limit ${limit}s)" | tee -a "$LOGS/$name.log" ${OUT:+"$OUT/stages.log"}
  timeout -s INT -k 5 "$limit" "$@" 2>&1 | tee -a "$LOGS/$name.log" ${OUT:+"$OUT/stages.log"}
  echo "${PIPESTATUS[0]} $(( $(date +%s) - start ))" >"$LOGS/$name.rc"
}

# Stage limits in seconds (0 skips a stage): when GPU time is short, run e.g.
#   GPU_CHECK_KERNELS_S=60 GPU_CHECK_TESTS_S=0 GPU_CHECK_BENCH_S=110 bash bench/gpu_check.sh
# or pick stages by name: GPU_CHECK_STAGES=kernels,bench bash bench/gpu_check.sh (default: all of them).
# Files never run on a GPU before go first, so that a short run still covers them; pytest drops the repeats.
ALL_STAGES=kernels,peft_fast,fused,memory,moe,bench,host,profile,distributed,serving
STAGES=",${GPU_CHECK_STAGES:-$ALL_STAGES},"
stages_given=${GPU_CHECK_STAGES:-}
case "$stages_given" in *" "*) echo "GPU_CHECK_STAGES: names separated by commas only, got '$stages_given'"; exit 2;; esac
for s in ${stages_given//,/ }; do  # a misspelt name would silently run nothing of it
  case ",$ALL_STAGES," in *",$s,"*) ;; *) echo "GPU_CHECK_STAGES: unknown stage '$s' (stages: $ALL_STAGES)"; exit 2;; esac
done
picked() { case "$STAGES" in *",$1,"*) return 0;; *) return 1;; esac; }
existing() { local f; for f in "$@"; do [ -e "$f" ] && printf '%s ' "$f"; done; }
FIRST_TESTS=${GPU_CHECK_FIRST_TESTS:-}
# New on a GPU: the cached launches (launch.py; test_launch checks them against this machine's Triton on a stand-in
# device, and every kernel test after it launches through them), the one-launch decode (lora_decode.py), the
# forward-only kernels as custom ops (test_opaque_ops), DoRA with dropout (masked_add, the expand's
# residual epilogue), the two-matmul launch of the LoRA backward (lora_mm.py), then the kernels built on them.
[ -z "$FIRST_TESTS" ] && FIRST_TESTS=$(existing tests/kernels/test_launch.py tests/kernels/test_lora_decode.py \
  tests/kernels/test_opaque_ops.py tests/kernels/test_dora_dropout_linear.py tests/kernels/test_lora_mm.py \
  tests/kernels/test_lora_linear.py tests/kernels/test_dora_linear.py \
  tests/kernels/test_qlora_linear.py tests/kernels/test_multi_lora.py tests/kernels/test_dora_norm.py)
# GPU_CHECK_ONLY_NEW=1: only those first files, in the kernels and bench stages (a quick check after a change).
ALL_TESTS=tests/kernels ALL_BENCH=bench
[ "${GPU_CHECK_ONLY_NEW:-0}" = 1 ] && ALL_TESTS="" && ALL_BENCH=""
# GPU_CHECK_PYTEST_ARGS: extra pytest arguments for the kernels stage (e.g. "--maxfail=5 -x").
stage kernels "${GPU_CHECK_KERNELS_S:-60}" $FIRST_TESTS $ALL_TESTS -q -rf --tb=short $TEST_TIMEOUT \
  ${GPU_CHECK_PYTEST_ARGS:-}
# New on a GPU, first: test_offload_checkpoints (its CUDA tests measure the memory the offload frees and delay the
# copies' stream) and test_compiled_training (a training step replayed as CUDA graphs, mode="reduce-overhead").
GRACE=30 stage peft_fast "${GPU_CHECK_TESTS_S:-30}" tests/peft_fast/test_offload_checkpoints.py \
  tests/peft_fast/test_compiled_training.py tests/peft_fast -q $XDIST $TEST_TIMEOUT \
  --ignore=tests/peft_fast/test_fused_ops.py --ignore=tests/peft_fast/test_fused_decoder.py  # the fused stage runs them
# Rows are written as measured (into $OUT when set), so they survive a stage that times out.
export PEFT_FAST_BENCH_ROWS="${OUT:-$LOGS}/bench_rows.jsonl"
# The fused decoder: Liger's side of its tests (its RMSNorm, SwiGLU and soft-capped loss fail under the CPU
# interpreter, so they run only here; the compile backend's tests run on CPUs), then the 1.1B and 8B-shape QLoRA
# training steps: PEFT + bitsandbytes, the same with Liger's kernels, peft_fast unfused and fused (compile, liger),
# and fused with offload_checkpoints.
# Liger-Kernel comes from .whl/ like bitsandbytes. The first compile-backend step compiles (cold: tens of seconds).
stage fused "${GPU_CHECK_FUSED_S:-90}" tests/peft_fast/test_fused_ops.py tests/peft_fast/test_fused_decoder.py \
  bench/test_bench_fused_decoder.py -k "liger or fused_decoder_train_step" -q -rf --tb=short $TEST_TIMEOUT --benchmark-json="$LOGS/fused.json" \
  --benchmark-min-rounds=3 --benchmark-max-time=0.2
# Where a QLoRA step's peak memory goes (parameters, optimizer state, activations, temporaries; torch's MemTracker) at
# 1.1B and 8B shapes, for PEFT, peft_fast, DoRA in both (its peak over LoRA's: issue #11's 1.05x), peft_fast fused
# and fused with offload_checkpoints (its host memory in a column of its own): a table in the log and memory.json,
# rows written as they are measured.
script memory "${GPU_CHECK_MEMORY_S:-50}" $PY bench/memory_report.py --device cuda --json "${OUT:-$LOGS}/memory.json"
# LoRA on mixture-of-experts weights: the grouped kernels' tests, then one experts layer at Mixtral-8x7B and
# Qwen3-30B-A3B shapes against PEFT and against the layer without LoRA (rows into the table). (The model tests in
# tests/peft_fast/test_lora_experts.py run on CPUs only.)
stage moe "${GPU_CHECK_MOE_S:-40}" tests/kernels/test_grouped_lora.py \
  bench/test_bench_moe.py -q -rf --tb=short $TEST_TIMEOUT --benchmark-json="$LOGS/moe.json" \
  --benchmark-min-rounds=3 --benchmark-max-time=0.2
FIRST_BENCH=${GPU_CHECK_FIRST_BENCH:-}
# DoRA and QLoRA first: the LoRA layer's 27 rows alone can fill the stage's limit.
[ -z "$FIRST_BENCH" ] && FIRST_BENCH=$(existing bench/test_bench_dora.py bench/test_bench_qlora_linear.py \
  bench/test_bench_lora_linear.py)
stage bench "${GPU_CHECK_BENCH_S:-75}" $FIRST_BENCH $ALL_BENCH --ignore=bench/test_bench_serving.py \
  --ignore=bench/test_bench_moe.py --ignore=bench/test_bench_fused_decoder.py -q $TEST_TIMEOUT \
  --benchmark-json="$LOGS/bench.json" --benchmark-min-rounds=3 --benchmark-max-time=0.5 \
  --benchmark-warmup=on --benchmark-warmup-iterations=2 --benchmark-columns=median,iqr,rounds

# Host time per layer call with real launches on the GPU, through peft_fast's cached launches and through Triton's
# dispatcher on every launch (bench/host_overhead.py also runs on CPUs: stubbed, or on a stand-in GPU).
script host "${GPU_CHECK_HOST_S:-35}" $PY bench/host_overhead.py --device cuda --json "$LOGS/host.json"

# Where the QLoRA layer's time goes (kernel times, host overhead, profiler tables): a log only, for the next change.
script profile "${GPU_CHECK_PROFILE_S:-15}" $PY bench/profile_qlora.py | grep -E "^(host|[0-9]+x[0-9]+:|==)" || true

# Serving: mixed batches captured as CUDA graphs (bench/test_bench_serving.py, rows into the same table), then
# examples/serve_adapters.py with 64 adapters under CUDA graphs (its tokens must equal PEFT's).
stage serving "${GPU_CHECK_SERVING_S:-50}" bench/test_bench_serving.py tests/peft_fast/test_serve_example.py -q \
  $TEST_TIMEOUT --benchmark-json="$LOGS/serving.json" --benchmark-min-rounds=3 --benchmark-max-time=0.2
# examples/train_distributed.py under torchrun with NCCL on one GPU (FSDP2; then DoRA over NF4 codes stored as bf16).
stage distributed "${GPU_CHECK_DISTRIBUTED_S:-25}" tests/peft_fast/test_distributed.py -q -k one_gpu $TEST_TIMEOUT

mkdir -p bench/results
$PY bench/gpu_report.py "$LOGS" --seconds $(( $(date +%s) - T0 ))
