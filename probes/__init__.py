"""mi-krr's instruments: per-layer quantities read from a model through hooks (predictions, label
sensitivities, attention-induced kernels and their alignment with classical kernels), and the
scores, diagnoses, plots and reports built on them.

Every probe talks to a model only through `mi_krr.models.adapter.ICLModel`; start with
`probes.attach(model)`.
"""

from probes.alignment_metrics import alignment_metrics
from probes.attach import ProbedModel, attach
from probes.attention_kernels import AttentionKernels, attention_kernels
from probes.fitted_probes import LayerProbes, RidgeFit, fit_layer_probes
from probes.kernel_alignment import KernelAlignment, kernel_alignment
from probes.layer_predictions import layer_predictions
from probes.sensitivity import label_sensitivities, solver_sensitivities

from probes.compare import Comparison, compare
from probes.diagnose import DEFAULT_ALGORITHMS, diagnose
from probes.diagnosis import Diagnosis, TaskSetDiagnosis
from probes.diagnosis_archive import load_diagnosis, save_diagnosis
from probes.identifiability import Verdict, algorithm_agreement, identifiability_verdict
from probes.plots import diagnosis_figures
from probes.report import write_report
from probes.scoring import AlgorithmScore, monotone_alignment, mse_matrix, r2_matrix, score_algorithms
from probes.step_sizes import FittedStep
from probes.streaming import StreamedProbes, stream_probes

__all__ = [
    "DEFAULT_ALGORITHMS",
    "AlgorithmScore",
    "AttentionKernels",
    "Comparison",
    "Diagnosis",
    "FittedStep",
    "KernelAlignment",
    "LayerProbes",
    "ProbedModel",
    "RidgeFit",
    "StreamedProbes",
    "TaskSetDiagnosis",
    "Verdict",
    "algorithm_agreement",
    "alignment_metrics",
    "attach",
    "attention_kernels",
    "compare",
    "diagnose",
    "diagnosis_figures",
    "fit_layer_probes",
    "identifiability_verdict",
    "kernel_alignment",
    "label_sensitivities",
    "layer_predictions",
    "load_diagnosis",
    "monotone_alignment",
    "mse_matrix",
    "r2_matrix",
    "save_diagnosis",
    "score_algorithms",
    "solver_sensitivities",
    "stream_probes",
    "write_report",
]
