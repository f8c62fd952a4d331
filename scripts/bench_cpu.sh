#!/usr/bin/env bash
# The speed issue's CPU bars in one run (8 min on a 2-core Zen 5), each side by side in one process,
# then one table of them (scripts/cpu_bars.py):
#   1. The fp32 training step at the quickstart shape against nanoGPT as shipped (its own checkout,
#      the second argument or NANOGPT_DIR; without one that row says not measured); then nanojax's
#      bf16 step against its fp32 one in a process of their own (with nanoGPT's side in the same
#      process the bf16 ratio came out 5-9% lower: docs/performance/training.md, "The norms").
#   2. The fp32 training step at GPT-2 124M against PyTorch eager (HF GPT2LMHeadModel); then the
#      bf16 step against fp32 in a process of their own, as in 1.
#   3. fp32 decode, llama-134m at batch 1, against llama.cpp F32 (llama-cpp-python: the `bench`
#      extra; without it that row says not measured).
#   (Where bf16 runs on MKL and oneDNN is built too, 1 also times the bf16 step on each library.)
#   4. The quickstart trained in fp32 and in bf16, 2000 steps each: whole-split val losses
#      (QUALITY=0 skips this part, ~2-3 min).
#   5. Not a bar: where the quickstart step's time goes in fp32 and in bf16, a trace of 3 steps each
#      summarised by XLA op and kernel (profile_float32.txt, profile_bfloat16.txt; PROFILE=0 skips
#      it, ~1 min), so that a run on a CPU family not seen before brings its profile with it.
#
#   bash scripts/bench_cpu.sh [OUT_DIR] [NANOGPT_DIR]     # logs and JSON to OUT_DIR (out/bench_cpu)
#
# Needs the test extra (torch, transformers: `make install-test`). The quality runs train on DATA
# (default data/shakespeare_char, what `make data` prepares), prepared here if missing: downloaded,
# or from SHAKESPEARE=path/to/input.txt offline. docs/performance.md keeps the tables
# this printed, one per CPU family.
set -uo pipefail  # no -e: a part that fails leaves its row "not measured", the others still run
cd "$(dirname "$0")/.."
out="${1:-out/bench_cpu}"
nanogpt="${2:-${NANOGPT_DIR:-}}"
data="${DATA:-data/shakespeare_char}"
py="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
mkdir -p "$out"
rm -rf "$out"/*.json "$out"/quality_* "$out"/profile_*  # no numbers left over from an earlier run
export PYTHONUNBUFFERED=1
quiet() { grep -v "^I[0-9]"; }  # absl's INFO lines

echo "== $(date -u '+%F %T') UTC, load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out/started.txt"
if [ -n "$nanogpt" ] && [ -f "$nanogpt/model.py" ]; then
  ng=(--nanogpt_dir="$nanogpt")
else
  echo "no nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT, then pass its path):" \
    "the quickstart row will say not measured"
  ng=()
fi
if [ ${#ng[@]} -gt 0 ]; then
  "$py" scripts/bench_train.py --shapes=shakespeare --nobias --notorch "${ng[@]}" --rounds=9 \
    --json="$out/train_quickstart.json" 2>&1 | quiet | tee "$out/train_quickstart.txt"
fi
"$py" scripts/bench_train.py --shapes=shakespeare --nobias --notorch --bf16_ab --rounds=9 \
  --json="$out/train_quickstart_bf16.json" 2>&1 | quiet | tee "$out/train_quickstart_bf16.txt"
# Where the bf16 products run on MKL (the Intel family) and oneDNN is built too, the bf16 step on
# each, side by side in a process of their own: which library the family's measured choice should be
# (cpu_gemm.MEASURED). Not a bar; train_quickstart_bf16_libs.txt keeps the table.
other=$("$py" -c "from nanojax.kernels import cpu_gemm as g
print('onednn' if g.library('bfloat16') == 'mkl' and 'onednn' in g.built() else '')" 2>/dev/null | tail -1)
if [ -n "$other" ]; then
  "$py" scripts/bench_train.py --shapes=shakespeare --nobias --notorch --dtype=bfloat16 --bf16_lib_ab="$other" \
    --rounds=9 2>&1 | quiet | tee "$out/train_quickstart_bf16_libs.txt"
fi
"$py" scripts/bench_train.py --shapes=gpt2 --rounds=5 --json="$out/train_gpt2.json" 2>&1 \
  | quiet | tee "$out/train_gpt2.txt"
"$py" scripts/bench_train.py --shapes=gpt2 --notorch --bf16_ab --rounds=5 --json="$out/train_gpt2_bf16.json" \
  2>&1 | quiet | tee "$out/train_gpt2_bf16.txt"
if "$py" -c "import llama_cpp" 2>/dev/null; then
  "$py" scripts/bench_decode.py --shapes=llama-134m --batches=1 --llama_cpp --llama_types=F32 --no_hf \
    --repeats=7 --json="$out/decode.json" 2>&1 | quiet | tee "$out/decode.txt"
else
  echo "no llama-cpp-python (pip install -e '.[bench]'): the decode row will say not measured"
fi
if [ "${QUALITY:-1}" != "0" ]; then
  if [ ! -f "$data/meta.json" ]; then  # as `make data` prepares it
    src=()  # prepare_data.py's Tiny Shakespeare URL
    [ -n "${SHAKESPEARE:-}" ] && src=(--input="$SHAKESPEARE")
    "$py" scripts/prepare_data.py "${src[@]}" --tokenizer=char --out_dir="$data" 2>&1 | quiet | tail -2 \
      || echo "no Shakespeare data in $data (offline? SHAKESPEARE=path/to/input.txt)"
  fi
  for dtype in float32 bfloat16; do
    "$py" scripts/train.py --config=configs/shakespeare_char_cpu.py --workdir="$out/quality_$dtype" \
      --config.data_dir="$data" --config.model.dtype=$dtype > "$out/quality_$dtype.log" 2>&1
    echo "$dtype: $(tr '\r' '\n' < "$out/quality_$dtype.log" | grep -a "^done:" || echo "failed, see $out/quality_$dtype.log")"
  done
fi
if [ "${PROFILE:-1}" != "0" ]; then
  for dtype in float32 bfloat16; do
    "$py" scripts/bench_train.py --shapes=shakespeare --nobias --notorch --dtype=$dtype --rounds=3 \
      --profile_dir="$out/profile_$dtype" 2>&1 | quiet > "$out/profile_$dtype.txt"
    grep -A16 "profile of" "$out/profile_$dtype.txt" || echo "the $dtype profile failed (see $out/profile_$dtype.txt)"
  done
fi
"$py" scripts/cpu_bars.py --dir="$out" 2>&1 | quiet | tee "$out/bars.md"
