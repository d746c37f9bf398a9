#!/usr/bin/env bash
# Builds the released checkpoints: scBERT 2.0 small and MoE pretrained on the corpus of ../shared/data (every
# pretraining file plus Papalexi's Perturb-seq cells; Baron mouse and pbmc68k_reduced stay out, they are the
# evaluation sets), and scBERT v1 small on the pretraining files' highly variable genes (Papalexi's 299-gene panel
# would leave most of a v1 panel masked). Each run resumes from its last checkpoint when interrupted; a finished run
# is not redone.
#
#     bash checkpoints/build.sh            # about 2 h on 2 CPU cores (times: checkpoints/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
data=../shared/data
runs=${RUNS:-outputs/checkpoints}
python=${PYTHON:-.venv/bin/python}
for spec in "scbert2-small 1" "scbert2-moe 1"; do
  set -- $spec
  architecture=$1 epochs=$2
  if [ ! -f "$runs/$architecture/pretrain_summary.json" ]; then
    $python -m train.pretrain --corpus "$data/pretrain" "$data/perturbseq/papalexi2021_thp1_lowmoi.h5ad" \
      --architecture "$architecture" --max_length 512 --num_epochs "$epochs" --learning_rate 1e-3 \
      --per_device_batch_size 16 --eval_steps 500 --logging_steps 50 --checkpointing_steps 250 \
      --resume_from_checkpoint latest --no_progress_bar --output_dir "$runs/$architecture"
  fi
  if [ -f train/release.py ]; then
    $python -m train.release --run "$runs/$architecture" --output "checkpoints/$architecture"
  fi
done
if [ ! -f "$runs/scbert-small/pretrain_summary.json" ]; then
  $python -m train.pretrain --corpus "$data/pretrain" --architecture scbert-small --panel_genes 1500 \
    --num_epochs 2 --learning_rate 1e-3 --per_device_batch_size 16 --eval_steps 250 --logging_steps 50 \
    --checkpointing_steps 250 --resume_from_checkpoint latest --no_progress_bar --output_dir "$runs/scbert-small"
fi
$python -m train.release --run "$runs/scbert-small" --output checkpoints/scbert-small
