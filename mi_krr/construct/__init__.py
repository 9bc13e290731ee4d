"""Hand-built reference transformers that run KRR solvers exactly, layer by layer.

- `cg_transformer`: linear attention + aggregator token, conjugate gradient on (K + lam I) alpha = y
  (linear kernel exactly, exp / Gaussian kernels through an m-wide feature map in the head);
  4 blocks per step.
- `richardson_transformer`: softmax attention, row-sum preconditioned Richardson on a Gaussian
  kernel (softmax applies D^-1 K exactly; a sink token recovers D); 3 blocks per step.
- `gd_transformer`: one linear self-attention layer per gradient-descent step on linear
  regression (von Oswald et al.); 1 block per step.

Each returns a `ConstructedTransformer` (a TransformerLens `HookedRootModule` with
`ICLTransformer`'s hook names, implementing `ICLModel`), with `layers_per_step`,
`state_coordinates`, `step_hook_names()` and `step_states(task)`. MLP arithmetic is "exact"
(idealised product / reciprocal units) or "relu" (ReLU interpolants whose error falls with
`mlp_width`). Studies (`width_study`, `cg_rate_study`, `relu_width_study`) are in
`mi_krr.construct.studies`.
"""

from mi_krr.construct.cg import cg_transformer, kernel_feature_map
from mi_krr.construct.gd import gd_transformer
from mi_krr.construct.richardson import richardson_transformer
from mi_krr.construct.transformer import ConstructedTransformer, ResidualLayout, StepStates

__all__ = [
    "ConstructedTransformer",
    "ResidualLayout",
    "StepStates",
    "cg_transformer",
    "gd_transformer",
    "kernel_feature_map",
    "richardson_transformer",
]
