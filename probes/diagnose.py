"""`diagnose(model, tasks)`: which KRR algorithm, if any, do the model's layers follow?

For each task set: build the KRR system from the prompts (kernel and lam from the arguments or
from what the sampler recorded in `task.info`), run every candidate solver for `n_steps`,
read each layer's predictions (and label sensitivities, and attention-kernel alignment) from the
model, score every algorithm against the layers (`probes.scoring`) and give the verdict
(`probes.identifiability`). The result, `Diagnosis` (`probes.diagnosis`), prints (`summary`),
plots (`plot`), tabulates (`to_dataframe`), serialises (`to_json`) and writes a report folder
(`save`).

    import probes
    d = probes.diagnose(model, task)
    print(d.summary())
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from mi_krr._validation import check_choice, check_count, check_positive, check_seed
from mi_krr.kernels import KERNEL_NAMES, condition_number, kernel_defaults, kernel_matrix, kernel_parameters
from mi_krr.solvers import ALGORITHMS
from mi_krr.solvers.direct import krr
from mi_krr.tasks import ICLTask
from mi_krr.tasks.task import check_task
from mi_krr.tasks.optimal import bayes_optimal_ridge
from probes.attention_kernels import AttentionKernels
from probes.diagnosis import Diagnosis, TaskSetDiagnosis
from probes.identifiability import RIDGE_LENS_BIAS, check_thresholds, identifiability_verdict
from probes.kernel_alignment import REFERENCE_KERNELS, kernel_alignment, reference_kernel_names
from probes.layer_predictions import METHODS, check_train_task, layer_predictions
from probes.scoring import overflow_limit, score_algorithms
from probes.sensitivity import label_sensitivities, solver_sensitivities
from probes.spectral_trajectories import FITTED_STEP_ALGORITHMS
from probes.step_sizes import STEP_SIZES, fit_global_steps
from probes.streaming import encode_for_probe, model_device_dtype, probe_model, resolve_layers, stream_probes

DEFAULT_ALGORITHMS = ("cg", "jacobi_cg", "gd", "richardson_jacobi", "richardson_rowsum", "chebyshev", "heavy_ball", "newton")
ALIGNMENT_BLOCK = "query"
"""The attention block diagnose compares with the reference kernels (query x support rows)."""
STAGES = ("KRR system", "model pass", "solver trajectories", "sensitivities", "kernel alignment", "scores")


def default_n_steps(n_layers: int) -> int:
    """Solver steps compared with an L-layer model: max(2 L, 20), so the alignment can give each
    layer up to two steps on average (trained models often do more than one step per layer) and
    short models still see the slow solvers' early trajectory."""
    return max(2 * n_layers, 20)


def diagnose(
    model: Any,
    tasks: ICLTask | dict[str, ICLTask],
    algorithms: Sequence[str] | dict[str, Callable[..., Any]] = DEFAULT_ALGORITHMS,
    kernels: Sequence[str] = REFERENCE_KERNELS,
    kernel: str = "auto",
    kernel_params: dict[str, float] | None = None,
    lam: float | None = None,
    n_steps: int | None = None,
    method: str = "readout",
    layers: Sequence[int] | None = None,
    train_task: ICLTask | None = None,
    sensitivities: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
    n_kappa_bins: int = 3,
    min_score: float = 0.9,
    min_gap: float = 0.01,
    agreement_threshold: float = 0.99,
    progress: bool = True,
    step_sizes: str = "fitted",
) -> Diagnosis:
    """Diagnose which KRR algorithm the model's layers follow on each task set.

    Args:
        model: an mi-krr ICL model (`mi_krr.models.adapter.ICLModel`).
        tasks: an `ICLTask`, or a dict name -> `ICLTask` (e.g. in-distribution and shifts); a
            lone `ICLTask` is the task set named "tasks" (`diagnosis["tasks"]`).
        algorithms: candidate solvers: names in `mi_krr.solvers.ALGORITHMS` (step sizes as
            `step_sizes` says; every other parameter spectrum-optimal per prompt), or a dict
            name -> solver callable with the registry signature
            `(K, y, lam, n_steps, K_query=None) -> Trajectory`, e.g.
            `{"gd(step=0.04)": functools.partial(mi_krr.solvers.richardson, step=0.04)}`, used as
            given (registry solvers in the dict are treated like names).
        kernels: reference kernels for the attention alignment ("exp", "gaussian"); empty skips it.
        kernel: the KRR kernel ("linear", "exp", "gaussian") of the reference system (built in
            float64 from the prompts as the model sees them, i.e. cast to its dtype), or "auto":
            `task.info["kernel"]` (GP sampler), "linear" for the linear-regression sampler, else
            an error.
        kernel_params: the kernel's keywords (bandwidth / temperature); default: from
            `task.info`, else the kernel's defaults (a keyword `kernel_params` leaves out also
            takes the kernel's default; the result records every value used).
        lam: the ridge; default the Bayes-optimal one of the sampler in `task.info`
            (`resolve_lam`: noise_std^2 for GP regression, noise_std^2 * d for linear regression).
        n_steps: solver steps T; default `default_n_steps(model.n_layers)` = max(2 L, 20).
        method: layer predictions, "readout" (the model's own read-out on every layer) or
            "ridge" (probes fitted on `train_task`; scored and ranked, but the verdict is withheld:
            `probes.identifiability.RIDGE_LENS_BIAS`).
        layers: residual indices to probe, increasing (default all 0..L); layer 0 is never scored.
            They select the layer predictions, scores and sensitivities; the kernel alignment
            covers every attention block whatever `layers` holds (`kernels=()` skips it).
        train_task: prompts to fit ridge probes on (method="ridge" only).
        sensitivities: also compare label sensitivities d yhat / d y (opt-in: one backward pass
            per layer and query, tens of times the cost of everything else; `mi-krr diagnose`
            turns it on).
        bootstrap: prompt resamples for the intervals (0: no intervals and no verdict; a verdict
            needs >= `MIN_VERDICT_RESAMPLES` = 100 resamples and >= `MIN_VERDICT_PROMPTS` = 20
            prompts, see `probes.identifiability`).
        seed: seed of the bootstrap resamples, of the cross-fitting halves of the fitted steps
            (so the fitted algorithms' point estimates, too, may move with it) and of the ridge
            probes' validation split and control (method="ridge").
        n_kappa_bins: quantile bins of the condition number for stratified scores.
        min_score, min_gap, agreement_threshold: verdict thresholds (see
            `probes.identifiability`).
        progress: show a progress bar over the stages.
        step_sizes: for the step-size-parameterised algorithms (`FITTED_STEP_ALGORITHMS`: gd,
            richardson_jacobi, richardson_rowsum, heavy_ball), "fitted" (default): ONE global
            step for all prompts (and heavy ball's momentum), fitted to the model's layers by a
            log-grid line search refined by Brent's method, every candidate evaluated in closed form
            from one eigendecomposition per prompt, cross-fitted on two halves of the
            prompts so every prompt is scored with a step fitted on the other half (see
            `probes.step_sizes`; reported in `TaskSetDiagnosis.fitted_steps`, the summary and
            the JSON). A network with fixed weights runs one learning rate, not each prompt's
            optimal one. The bootstrap intervals resample prompts with the fitted steps held
            fixed, so they leave out the fit's own uncertainty; the two halves' steps, reported
            side by side, show how far it moves. "optimal": the registry's spectrum-optimal step
            of each prompt.

    The model is read in ONE forward pass (`probes.streaming.stream_probes`: per-layer read-outs
    at the queries and the attention query block, reduced inside the hooks); label
    sensitivities add one differentiable pass and batched backward passes.
    """
    model = probe_model(model)
    task_sets = _check_tasks(tasks)
    algorithms = _check_algorithms(algorithms)
    kernels = reference_kernel_names(kernels)
    check_choice("method", method, METHODS)
    check_train_task(method, train_task)
    if kernel != "auto":
        check_choice("kernel", kernel, KERNEL_NAMES)
    layers = resolve_layers(model, layers)
    if any(later <= earlier for earlier, later in zip(layers, layers[1:])):
        raise ValueError(
            f"layers must be increasing without repeats (the layer -> step alignment reads them as depth), "
            f"got {layers}: pass {sorted(set(layers))}"
        )
    if not any(layer > 0 for layer in layers):
        raise ValueError("layers must include at least one block output (index >= 1); layer 0 is the embedding")
    n_steps = default_n_steps(model.n_layers) if n_steps is None else check_count("n_steps", n_steps, 1)
    if lam is not None:
        lam = check_positive("lam", lam)
    bootstrap = check_count("bootstrap", bootstrap, 0)
    seed = check_seed("seed", seed)
    n_kappa_bins = check_count("n_kappa_bins", n_kappa_bins, 1)
    min_score, min_gap, agreement_threshold = check_thresholds(min_score, min_gap, agreement_threshold)
    for name, flag in (("sensitivities", sensitivities), ("progress", progress)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    check_choice("step_sizes", step_sizes, STEP_SIZES)
    if step_sizes == "fitted" and any(registry_name(solver) in FITTED_STEP_ALGORITHMS for solver in algorithms.values()):
        for set_name, task in task_sets.items():
            if task.batch_size < 2:
                raise ValueError(
                    f"task set {set_name!r} holds {task.batch_size} prompt, but step_sizes='fitted' cross-fits global steps on "
                    "two halves of each set's prompts: pass >= 2 prompts there, or step_sizes='optimal'"
                )
    settings = {
        "algorithms": {name: _describe_solver(name, solver) for name, solver in algorithms.items()},
        "kernels": list(kernels),
        "method": method,
        "n_steps": n_steps,
        "bootstrap": bootstrap,
        "seed": seed,
        "n_kappa_bins": n_kappa_bins,
        "min_score": min_score,
        "min_gap": min_gap,
        "agreement_threshold": agreement_threshold,
        "layers": layers,
        "n_layers": int(model.n_layers),
        "step_sizes": step_sizes,
    }
    device, dtype = model_device_dtype(model)
    task_sets = {name: task.to(device=device, dtype=dtype) for name, task in task_sets.items()}
    prompts = {name: encode_for_probe(model, task) for name, task in task_sets.items()}  # the model's own checks, up front
    bar = tqdm(total=len(task_sets) * len(STAGES), desc="diagnose", disable=not progress, leave=False)
    results = {}
    with bar:
        for set_name, task in task_sets.items():
            results[set_name] = _diagnose_task_set(
                model,
                set_name,
                task,
                prompts[set_name],
                bar,
                algorithms=algorithms,
                kernels=kernels,
                kernel=kernel,
                kernel_params=kernel_params,
                lam=lam,
                n_steps=n_steps,
                method=method,
                layers=layers,
                train_task=None if train_task is None else train_task.to(device=device, dtype=dtype),
                sensitivities=sensitivities,
                step_sizes=step_sizes,
                bootstrap=bootstrap,
                seed=seed,
                n_kappa_bins=n_kappa_bins,
                verdict_thresholds={"min_score": min_score, "min_gap": min_gap, "agreement_threshold": agreement_threshold},
            )
    return Diagnosis(task_sets=results, settings=settings)


def _diagnose_task_set(model, set_name, task, prompt, bar, *, algorithms, kernels, kernel, kernel_params, lam, n_steps, method,
                       layers, train_task, sensitivities, step_sizes, bootstrap, seed, n_kappa_bins, verdict_thresholds) -> TaskSetDiagnosis:
    """All stages on one task set (see `diagnose`); `prompt` is `model.encode(task)`."""
    seconds: dict[str, float] = {}
    notes: list[str] = []
    clock = [time.perf_counter()]

    def stage_done(stage: str) -> None:
        """Record `stage`'s time and name the next one on the bar while it runs."""
        now = time.perf_counter()
        seconds[stage] = now - clock[0]
        clock[0] = now
        bar.update(1)
        following = STAGES.index(stage) + 1
        if following < len(STAGES):
            bar.set_postfix_str(f"{set_name}: {STAGES[following]}")

    bar.set_postfix_str(f"{set_name}: {STAGES[0]}")

    kernel_name, params = resolve_kernel(task, kernel, kernel_params)
    lam = resolve_lam(task, lam)
    x_support = task.x_support.detach().to(torch.float64)
    x_query = task.x_query.detach().to(torch.float64)
    y = task.y_support.detach().to(torch.float64)
    K = kernel_matrix(kernel_name, x_support, None, **params)
    K_query = kernel_matrix(kernel_name, x_query, x_support, **params)
    kappa = condition_number(K, lam)
    krr_pred = torch.einsum("bmn,bn->bm", K_query, krr(K, y, lam))
    if not bool(krr_pred.any()):
        raise ValueError(
            f"task set {set_name!r}: KRR predicts 0 for every query (all-zero labels y_support, or a kernel so narrow "
            "that no query sees a support point), so every solver predicts 0 at every step and no algorithm can be "
            "scored: use labels that vary, or a wider kernel"
        )
    stage_done("KRR system")

    read_layers = layers if method == "readout" else []  # the read-out lens rides on the one pass
    blocks = (ALIGNMENT_BLOCK,) if kernels and model.attention_hook_names() else ()  # no attention: the alignment notes why
    streamed = stream_probes(model, prompt, layers=read_layers, blocks=blocks) if read_layers or blocks else None
    if method == "readout":
        assert streamed is not None and streamed.readouts is not None  # read_layers = layers, never empty
        read = streamed.readouts.to(torch.float64)
    else:
        read = layer_predictions(model, task, method=method, layers=layers, train_task=train_task, seed=seed)
    stage_done("model pass")

    scored = np.flatnonzero(np.asarray(layers) > 0)
    layer_pred = _numpy(read)  # float64 NumPy from here on (the step predictions too): the fits and the scores read it
    limit = overflow_limit(layer_pred.size + len(algorithms) * K_query.shape[0] * (n_steps + 1) * K_query.shape[1])  # as the scores will
    _check_layer_predictions(set_name, layer_pred, layers, limit)
    fitted, unfit = {}, {}
    registry = {name: registry_name(solver) for name, solver in algorithms.items()}  # label -> registry name or None
    if step_sizes == "fitted":
        names = list(dict.fromkeys(entry for entry in registry.values() if entry in FITTED_STEP_ALGORITHMS))
        by_registry, unfit_by_registry = fit_global_steps(names, K, y, lam, K_query, n_steps, layer_pred, scored, seed)
        fitted = {name: by_registry[entry] for name, entry in registry.items() if entry in by_registry}
        unfit = {name: unfit_by_registry[entry] for name, entry in registry.items() if entry in unfit_by_registry}
    solvers: dict[str, Callable[..., Any]] = {}
    step_preds = {}
    for name, solver in algorithms.items():
        try:
            if name in unfit:
                raise unfit[name]
            if name in fitted:
                solver = fitted[name].solver()
            step_preds[name] = _checked_step_predictions(name, solver(K, y, lam, n_steps, K_query=K_query), K_query.shape, n_steps, limit)
            solvers[name] = solver
        except ValueError as error:  # e.g. the row-sum preconditioner on a kernel with negative rows
            fitted.pop(name, None)
            notes.append(f"{name} left out: it does not apply to this system ({error})")
    if not step_preds:
        raise ValueError(f"none of the algorithms {tuple(algorithms)} applies to task set {set_name!r}: {'; '.join(notes)}")
    stage_done("solver trajectories")

    layer_sens, step_sens = None, None
    if sensitivities and method == "readout":
        layer_sens = label_sensitivities(model, task, layers=layers)
        step_sens = {}
        for name, solver in solvers.items():
            if name in fitted:  # richardson / heavy ball with explicit steps: linear in y
                step_sens[name] = _numpy(solver_sensitivities(solver, K, K_query, lam, n_steps, linear_in_y=True))
            elif (entry := registry[name]) is not None:
                step_sens[name] = _numpy(solver_sensitivities(entry, K, K_query, lam, n_steps, y=y))
            else:  # a custom callable: linear in y unknown, so differentiated at y
                step_sens[name] = _numpy(solver_sensitivities(solver, K, K_query, lam, n_steps, y=y))
    elif sensitivities:
        notes.append("label sensitivities skipped: they are defined for the read-out lens (method='readout'), not fitted probes")
    stage_done("sensitivities")

    alignment = None
    if kernels:
        attention = AttentionKernels.from_stream(streamed) if streamed is not None and blocks else None
        try:
            alignment = kernel_alignment(model, task, kernels=kernels, block=ALIGNMENT_BLOCK, attention=attention)
        except ValueError as error:
            notes.append(f"kernel alignment skipped: {error}")
    stage_done("kernel alignment")

    krr_values, kappa_values = _numpy(krr_pred), _numpy(kappa)
    layer_sens_values = None if layer_sens is None else _numpy(layer_sens)
    scores = score_algorithms(
        layer_pred,
        step_preds,
        krr_values,
        layers=layers,
        bootstrap=bootstrap,
        seed=seed,
        layer_sensitivity=layer_sens_values,
        step_sensitivities=step_sens,
        kappa=kappa_values,
        n_kappa_bins=n_kappa_bins,
    )
    verdict = identifiability_verdict(scores, step_preds, withheld=RIDGE_LENS_BIAS if method == "ridge" else None, **verdict_thresholds)
    stage_done("scores")
    return TaskSetDiagnosis(
        name=set_name,
        info=dict(task.info),
        kernel=kernel_name,
        kernel_params=params,
        lam=lam,
        n_steps=n_steps,
        n_support=task.n_support,
        layers=list(layers),
        kappa=kappa_values,
        layer_predictions=layer_pred,
        krr_predictions=krr_values,
        step_predictions=step_preds,
        scores=scores,
        verdict=verdict,
        layer_sensitivities=layer_sens_values,
        step_sensitivities=step_sens,
        kernel_alignment=alignment,
        fitted_steps=fitted,
        notes=notes,
        seconds=seconds,
    )


def resolve_kernel(task: ICLTask, kernel: str, kernel_params: dict[str, float] | None) -> tuple[str, dict[str, float]]:
    """The KRR kernel name and keywords for `task` ("auto": from `task.info`, see `diagnose`)."""
    if kernel == "auto":
        if "kernel" in task.info:
            kernel = task.info["kernel"]
        elif task.info.get("sampler") == "linear_regression":
            kernel = "linear"
        else:
            raise ValueError(
                "kernel='auto' found no kernel in task.info (sampled by neither the GP nor the linear-regression "
                f"sampler): pass kernel= one of {KERNEL_NAMES}"
            )
    check_choice("kernel", kernel, KERNEL_NAMES)
    allowed = kernel_parameters(kernel)
    defaults = kernel_defaults(kernel)  # every keyword is written out, so reports show the values used
    if kernel_params is None:  # the sampler's values, else the kernel's defaults
        return kernel, {name: float(task.info[name]) if task.info.get(name) is not None else defaults[name] for name in allowed}
    if not isinstance(kernel_params, Mapping):
        called = ": call it, sampler.kernel_params()" if callable(kernel_params) else ""
        raise ValueError(f"kernel_params must be a dict of kernel keywords such as {{'bandwidth': 0.5}}, got {kernel_params!r}{called}")
    unknown = sorted(set(kernel_params) - set(allowed))
    if unknown:
        raise ValueError(f"kernel_params for {kernel!r} may only set {allowed or 'nothing'}, got {unknown}")
    return kernel, {**defaults, **{name: check_positive(f"kernel_params[{name!r}]", value) for name, value in kernel_params.items()}}


def resolve_lam(task: ICLTask, lam: float | None) -> float:
    """`lam`, or when None the ridge that makes KRR the Bayes-optimal predictor of the sampler
    recorded in `task.info` (`mi_krr.tasks.optimal.bayes_optimal_ridge`: noise_std^2 for GP
    regression, noise_std^2 * d for linear regression with w ~ N(0, I/d))."""
    if lam is not None:
        return check_positive("lam", lam)
    try:
        ridge = bayes_optimal_ridge(task.info)
    except ValueError as error:
        raise ValueError(f"lam=None needs task.info from a known sampler ({error}): pass lam= explicitly") from None
    if not math.isfinite(ridge) or ridge <= 0:
        raise ValueError("lam=None needs task.info['noise_std'] > 0 (the Bayes-optimal ridge is 0 for noise-free labels): pass lam= explicitly")
    return ridge


def _check_tasks(tasks: Any) -> dict[str, ICLTask]:
    """`tasks` as a non-empty dict name -> ICLTask."""
    if isinstance(tasks, ICLTask):
        return {"tasks": tasks}
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError("tasks must be an ICLTask or a non-empty dict name -> ICLTask")
    for name, task in tasks.items():
        check_task(f"tasks[{name!r}]", task)
    named = {str(name): task for name, task in tasks.items()}
    if len(named) < len(tasks):
        raise ValueError(f"tasks' names must stay distinct as strings (results are keyed by str(name)), got {list(tasks)}: rename them")
    return named


def _check_layer_predictions(set_name: str, layer_pred: np.ndarray, layers: list[int], limit: float) -> None:
    """Refuse layer predictions `[B, L', m]` that are non-finite or beyond +-`limit`
    (`probes.scoring.overflow_limit`), naming the layers (a model whose activations overflow)."""
    bad = [layer for layer, values in zip(layers, np.moveaxis(layer_pred, 1, 0)) if not (np.abs(values) <= limit).all()]
    if bad:
        kept = [layer for layer in layers if layer not in bad]
        raise ValueError(
            f"task set {set_name!r}: the model's predictions at layers {bad} are not finite (or beyond +-{limit:.3g}): its "
            f"activations overflow there; diagnose the other layers with layers={kept}, or run the model in float64"
        )


def _checked_step_predictions(name: str, trajectory: Any, query_shape: torch.Size, n_steps: int, limit: float) -> np.ndarray:
    """The query predictions `[B, T+1, m]` of the trajectory candidate `name` returned, as a
    float64 NumPy array, after checking them (a custom solver's mistakes are named here, not deep
    inside the scores): finite and within +-`limit` (`probes.scoring.overflow_limit`)."""
    pred = getattr(trajectory, "pred", None)
    expected = (query_shape[0], n_steps + 1, query_shape[1])
    if pred is None or tuple(np.shape(pred)) != expected:
        got = f"a {type(trajectory).__name__} without pred" if pred is None else f"pred of shape {tuple(np.shape(pred))}"
        raise ValueError(
            f"algorithm {name!r} returned {got}: a solver must return a Trajectory whose pred is [batch, n_steps + 1, m] = {expected}"
        )
    pred = _numpy(pred)
    if not (np.abs(pred) <= limit).all():
        raise ValueError(
            f"algorithm {name!r} returned non-finite predictions or predictions beyond +-{limit:.3g} (it diverges on this "
            "task set: a step size too large, or an iteration that floating point cannot carry this far on so "
            "ill-conditioned a system)"
        )
    return pred


def registry_name(solver: Callable[..., Any]) -> str | None:
    """The `mi_krr.solvers.ALGORITHMS` name of `solver` (the registry's own function, under any
    label a user gives it), else None."""
    return next((name for name, registered in ALGORITHMS.items() if registered is solver), None)


def _describe_solver(name: str, solver: Callable[..., Any]) -> str:
    """How the settings record a candidate: "registry" for `mi_krr.solvers.ALGORITHMS[name]`
    ("registry: NAME" under another label), else the callable's qualified name (with a partial's
    keywords)."""
    registered = registry_name(solver)
    if registered is not None:
        return "registry" if registered == name else f"registry: {registered}"
    if isinstance(solver, functools.partial):
        keywords = ", ".join(f"{key}={value!r}" for key, value in solver.keywords.items())
        return f"{_describe_solver(name, solver.func)}({keywords})"
    return f"{getattr(solver, '__module__', '?')}.{getattr(solver, '__qualname__', type(solver).__name__)}"


def _check_algorithms(algorithms: Sequence[str] | dict[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    """Candidates as name -> solver: names from `ALGORITHMS`, or a dict of named callables with
    the registry signature `(K, y, lam, n_steps, K_query=None) -> Trajectory`."""
    if isinstance(algorithms, str):
        algorithms = (algorithms,)
    if isinstance(algorithms, dict):
        for name, solver in algorithms.items():
            if not isinstance(name, str) or not callable(solver) or not _takes_registry_arguments(solver):
                raise ValueError(
                    f"algorithms entry {name!r} must map a name to a solver callable (K, y, lam, n_steps, K_query=None) -> Trajectory"
                )
        candidates = dict(algorithms)
    else:
        names = tuple(algorithms)
        unknown = [name for name in names if name not in ALGORITHMS]
        if unknown:
            raise ValueError(f"unknown algorithm {unknown[0]!r}: choose from {tuple(ALGORITHMS)} or pass a dict name -> solver")
        if len(set(names)) != len(names):
            raise ValueError(f"algorithms must be distinct, got {names}")
        candidates = {name: ALGORITHMS[name] for name in names}
    if not candidates:
        raise ValueError(f"algorithms must name at least one of {tuple(ALGORITHMS)}")
    return candidates


def _takes_registry_arguments(solver: Callable[..., Any]) -> bool:
    """Whether `solver` can be called as solver(K, y, lam, n_steps, K_query=...) (True when its
    signature cannot be read)."""
    try:
        signature = inspect.signature(solver)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(None, None, None, None, K_query=None)
    except TypeError:
        return False
    return True


def _numpy(value: Any) -> np.ndarray:
    """A float64 NumPy copy of a tensor or array."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)
