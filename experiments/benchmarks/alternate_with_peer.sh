#!/bin/bash
# Alternate the PyTorch+lightly peer with our train step, the peer before and after every variant,
# one JSON line per run; quote ratios within one run only (BUILD_NOTES "Train-step benchmark").
#   experiments/benchmarks/alternate_with_peer.sh quick  "" "--mixed_precision=none --threads=default"
#   experiments/benchmarks/alternate_with_peer.sh resnet "" "--mixed_precision=mixed_bfloat16"
# quick: experiments/quick.flags' step vs ../shared/bench/peer_torch_quick.py (its exact configuration);
# resnet: the ResNet-18 step (batch 128, 32 px) vs ../shared/bench/peer_torch_step.py.
# Each further argument is one variant's extra flags ("" = the configuration as it is).
# PEER_PYTHON (default ~/peer-venv/bin/python) and PYTHON (default .venv/bin/python) pick the interpreters.
set -u
cd "$(dirname "$0")/../.."
peer_python=${PEER_PYTHON:-$HOME/peer-venv/bin/python}
python=${PYTHON:-.venv/bin/python}
case "${1:-}" in
  quick) peer_args=(../shared/bench/peer_torch_quick.py)
         ours_args=(--flagfile=experiments/quick.flags --steps=60 --warmup=10) ;;
  resnet) peer_args=(../shared/bench/peer_torch_step.py --batch 128 --image 32)
          ours_args=(--encoder=resnet18 --image_size=32 --batch_size=128 --predictor=directpred) ;;
  *) echo "usage: $0 quick|resnet [variant flags ...]" >&2; exit 2 ;;
esac
shift
peer() { echo "peer $("$peer_python" "${peer_args[@]}" 2>/dev/null | tail -1)"; }
peer
for variant in "$@"; do
  # shellcheck disable=SC2086  # a variant is a list of flags
  echo "ours [$variant] $("$python" experiments/bench.py train_step "${ours_args[@]}" $variant 2>/dev/null | tail -1)"
  peer
done
