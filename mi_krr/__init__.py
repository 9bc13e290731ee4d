"""mi-krr: is what an in-context regression transformer computes kernel ridge regression, and by
which algorithm?

Subpackages and modules: `mi_krr.kernels` (kernels, finite-width feature maps), `mi_krr.solvers`
(batched float64 solvers with per-step trajectories), `mi_krr.tasks` (ICL prompts and samplers),
`mi_krr.models` (TransformerLens models and the task/readout adapter), `mi_krr.construct`
(hand-built reference transformers), `mi_krr.train` (training and checkpoints),
`mi_krr.checkpoints` (find the shipped runs; load an mi-krr or Garg et al. checkpoint with the
prompts it was trained on).
"""

__version__ = "0.1.0"
