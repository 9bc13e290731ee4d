"""mi-krr's instruments: per-layer quantities read from a model through hooks (predictions, label
sensitivities, attention-induced kernels and their alignment with classical kernels), and the
scores, diagnoses, plots and reports built on them.

Every probe talks to a model only through `mi_krr.models.adapter.ICLModel`; start with
`probes.attach(model)`.
"""

from probes.attach import ProbedModel, attach
from probes.attention_kernels import AttentionKernels, attention_kernels
from probes.fitted_probes import LayerProbes, RidgeFit, fit_layer_probes
from probes.kernel_alignment import KernelAlignment, alignment_metrics, kernel_alignment
from probes.layer_predictions import layer_predictions
from probes.sensitivity import label_sensitivities, solver_sensitivities

# --- part 2 exports (scoring, diagnose, plots, report) go below this line ---
from probes.diagnose import Diagnosis, diagnose
