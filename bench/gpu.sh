#!/usr/bin/env bash
# Every GPU table of bench/ in one call, in under 9 minutes on one H100/H200, appended to bench/RESULTS.md with the
# device name, date and commit, so that all pending GPU figures are filled whenever a GPU is lent.
#
#   bench/gpu.sh                          # on the GPU machine (from the repo root or anywhere)
#   bench/gpu.sh --speedrun               # then also the speedrun (examples/speedrun, DEVICE=cuda), after the 9 min
#   bench/gpu.sh --device cpu --smoke     # dry run with tiny shapes (seconds each; tests/bench/test_gpu_sh.py)
#
# Options: --device DEV (default cuda), --smoke (tiny shapes), --results FILE (default bench/RESULTS.md),
#          --only NAME[,NAME...] (a subset of the table below), --budget SECONDS (default 530; smoke 1800),
#          --speedrun.
# Environment: PYTHON (default: python3).
#
# Each bench runs under its own time limit (the TABLE below; limits sum to the budget), so the whole run is bounded
# even if one bench hangs or compiles slowly; a bench that runs out of time is recorded as such, with what it
# printed. The GPU arguments are reduced from each bench's defaults where a default would not fit the budget.
set -u
cd "$(dirname "$0")/.."

DEVICE=cuda SMOKE=0 RESULTS=bench/RESULTS.md ONLY="" BUDGET="" SPEEDRUN=0
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --results) RESULTS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --speedrun) SPEEDRUN=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see bench/gpu.sh --help)" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# the dry run's time is CPU start-up (imports) on possibly busy cores: its limits are generous, not the GPU's
[ -z "$BUDGET" ] && { [ $SMOKE = 1 ] && BUDGET=1800 || BUDGET=530; }

# name | seconds allowed on the GPU | arguments on the GPU | arguments of the --smoke dry run (CPU seconds)
TABLE=(
  "train_lm|75|--steps 10|--batch 1 --steps 1"
  "train_optim|60|--steps 5 --repeats 2|--shape tiny --batch 2 --seq 16 --steps 1 --repeats 1"
  "sample|70|--shapes tinyllama-1.1b,llama2-7b --new-tokens 128|--shapes tiny --new-tokens 4"
  "perplexity|50||--batch 1 --seq 32 --reps 1 --no-compile"
  "quantize|130|--shapes tinyllama-1.1b --variants bf16,int8,int4,nf4,fp8,q8_0,q4_0,q4_k_m,q6_k --new-tokens 64|--shapes tiny --variants fp32,int8,int4,nf4,q8_0,q4_0,q4_k_m,q6_k --new-tokens 4"
  "diffusion|60|--steps 1500|--steps 2 --samples 32"
  "diffusion_lm|40|--preset small --steps 300 --seq-len 256 --blocks 16,4 --samples 8 --nfe 64,128|--preset tiny --steps 2 --seq-len 16 --micro-batch 2 --vocab 512 --blocks 4 --eval-tokens 256 --eval-samples 1 --samples 1 --nfe 8 --samplers ancestral,remdm"
  "lora|45|--steps 10|--batch 1 --seq 16 --steps 1 --warmup 0"
  "evaluate|45|--limit 100 --reps 3|--limit 2 --reps 1 --no-smollm2"
)

device_name=$("$PY" -c "
import platform, sys, torch
d = sys.argv[1]
print(torch.cuda.get_device_name(torch.device(d)) if d.startswith('cuda') else
      f'cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)')" "$DEVICE") || {
  echo "error: cannot use device $DEVICE" >&2; exit 1; }
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
start=$SECONDS
{
  echo
  echo "## GPU tables (bench/gpu.sh) — $(date -u +%Y-%m-%d), $device_name, commit $commit"
  echo
  echo "Command: \`bench/gpu.sh --device $DEVICE$([ $SMOKE = 1 ] && echo ' --smoke')\` (torch $("$PY" -c 'import torch; print(torch.__version__)'))."
  [ $SMOKE = 1 ] && echo "SMOKE RUN: tiny shapes, the figures mean nothing; it checks that every bench still runs."
} > "$out/report.md"

failed=0
for row in "${TABLE[@]}"; do
  IFS='|' read -r name limit gpu_args smoke_args <<< "$row"
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
  args=$gpu_args; [ $SMOKE = 1 ] && { args=$smoke_args; limit=300; }
  left=$((BUDGET - (SECONDS - start)))
  [ "$limit" -gt "$left" ] && limit=$left
  cmd="bench/$name.py --device $DEVICE $args"
  if [ "$limit" -lt 5 ]; then
    printf '\n### %s: skipped (the %ss budget is spent)\n' "$name" "$BUDGET" >> "$out/report.md"
    echo "gpu.sh: $name skipped: budget spent" >&2; failed=1; continue
  fi
  echo "gpu.sh: $cmd (limit ${limit}s)" >&2
  t0=$SECONDS
  # shellcheck disable=SC2086
  timeout --kill-after=10 "$limit" "$PY" bench/$name.py --device "$DEVICE" $args > "$out/$name.out" 2> "$out/$name.err"
  rc=$?
  took=$((SECONDS - t0))
  case $rc in
    0) status="${took}s" ;;
    124|137) status="TIMED OUT after ${limit}s (partial output)"; failed=1 ;;
    *) status="FAILED (exit $rc) after ${took}s"; failed=1 ;;
  esac
  {
    printf '\n### %s — %s\n\n`python %s`\n' "$name" "$status" "$cmd"
    cat "$out/$name.out"
    if [ $rc -ne 0 ]; then printf '\n```\n'; tail -n 15 "$out/$name.err"; printf '```\n'; fi
  } >> "$out/report.md"
  echo "gpu.sh: $name: $status" >&2
done
total=$((SECONDS - start))
printf '\nTotal: %ss of the %ss budget.\n' "$total" "$BUDGET" >> "$out/report.md"

if [ $SPEEDRUN = 1 ]; then
  echo "gpu.sh: speedrun (make -C examples/speedrun DEVICE=$DEVICE)" >&2
  if make -C examples/speedrun DEVICE="$DEVICE" GENTOOL="$PY -m gentool" > "$out/speedrun.out" 2> "$out/speedrun.err"; then
    status="done"; else status="FAILED or not shown better (exit $?)"; failed=1; fi
  { printf '\n### speedrun on %s — %s\n\n`make -C examples/speedrun DEVICE=%s`\n\n```\n' "$DEVICE" "$status" "$DEVICE"
    tail -n 40 "$out/speedrun.out"; printf '```\n'; } >> "$out/report.md"
fi

cat "$out/report.md" >> "$RESULTS"
echo "gpu.sh: appended to $RESULTS (${total}s)" >&2
exit $failed
