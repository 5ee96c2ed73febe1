#!/bin/bash
# Alternate the PyTorch+lightly peer (../shared/bench/peer_torch_step.py) with our train step,
# peer before and after every variant, one JSON line per run (BUILD_NOTES "Train-step benchmark").
#   PEER_PYTHON=~/peer-venv/bin/python experiments/benchmarks/alternate_with_peer.sh \
#       "" "--mixed_precision=mixed_bfloat16" "--jit_compile"
# Each argument is one variant's extra flags ("" = the peer's exact configuration).
set -u
cd "$(dirname "$0")/../.."
peer_python=${PEER_PYTHON:-$HOME/peer-venv/bin/python}
peer() { echo "peer $("$peer_python" ../shared/bench/peer_torch_step.py --batch 128 --image 32 2>/dev/null | tail -1)"; }
peer
for variant in "$@"; do
  # shellcheck disable=SC2086  # a variant is a list of flags
  echo "ours [$variant] $(python3 experiments/bench.py train_step --encoder=resnet18 --image_size=32 \
      --batch_size=128 --predictor=directpred $variant 2>/dev/null | tail -1)"
  peer
done
