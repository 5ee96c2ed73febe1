"""Study `tiny`: two configurations for tests/test_sweep.py (pair it with a tiny --extra budget).

One configuration evaluates the baselines, the other does not, so the test exercises the
random-init row being taken from whichever run has it.
"""

DESCRIPTION = "Two-configuration smoke study for the sweep's own test."

CONFIGS = [
    {"name": "directpred", "flags": ["--predictor=directpred", "--rho=0.3", "--eps=0.1", "--freq=1"],
     "description": "DirectPred (evaluates the baselines)"},
    {"name": "sgd_linear", "flags": ["--predictor=linear", "--eval_baselines=false"],
     "description": "SGD-trained linear predictor"},
]

CLAIMS = [
    {"kind": "at_least", "a": "directpred", "b": "sgd_linear", "metric": "linear_probe_top1",
     "text": "DirectPred >= SGD-trained linear predictor"},
]
