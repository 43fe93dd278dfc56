#!/usr/bin/env bash
# FVU and L0 of every architecture on MiniLM layer 3 over Wikipedia summaries: same tokens, same steps.
# Usage: bash benchmarks/architecture_table.sh [RUN] [STEPS]   (about 25 minutes on 2 CPU cores)
set -euo pipefail
RUN=${1:-runs/arch-table}
STEPS=${2:-1000}
saex=.venv/bin/saex
$saex harvest --run "$RUN" --model minilm --dataset wiki --hook blocks.3.hook_resid_post --max-examples 2000
common=(--run "$RUN" --steps "$STEPS" --batch-size 1024 --expansion 8 --seed 0)
$saex train "${common[@]}" --architecture relu --l1-variant april --sparsity-coefficient 5 --name relu-april
$saex train "${common[@]}" --architecture relu --l1-variant classic --sparsity-coefficient 5 --name relu-classic
$saex train "${common[@]}" --architecture topk --k 32 --name topk
$saex train "${common[@]}" --architecture batchtopk --k 32 --name batchtopk
$saex train "${common[@]}" --architecture batchtopk --k 32 --matryoshka fixed --name matryoshka-batchtopk
$saex train "${common[@]}" --architecture jumprelu --sparsity-coefficient 3 --name jumprelu
$saex train "${common[@]}" --architecture gated --sparsity-coefficient 5 --name gated
$saex train "${common[@]}" --architecture prolu --prolu-grad ste --sparsity-coefficient 5 --name prolu-ste
$saex eval --run "$RUN" --examples 300
