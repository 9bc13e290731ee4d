"""`mi-krr diagnose PATH`: which KRR algorithm do a checkpoint's layers follow, in distribution and
under every applicable distribution shift?

    mi-krr diagnose checkpoints/softmax_gp
    mi-krr diagnose runs/garg_linear --n-support 30 --lam 1e-3 --out reports/garg
    mi-krr diagnose checkpoints/linear_lr --method ridge --no-shifts

PATH is an mi-krr run folder (config.json + model.safetensors or state/), one of its checkpoint
files, or a Garg et al. run folder (config.yaml + state.pt / model_<step>.pt) or .pt file. The
prompts come from the checkpoint's own sampler config (Garg: noiseless linear regression at its
n_dims); --task / --n-support / --n-query / --batch / --lam override them. Writes a report folder
(index.md, PNG figures, report.json) to --out.
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_OUT = "reports/diagnose"


def add_arguments(parser: argparse.ArgumentParser) -> str:
    """The options of `mi-krr diagnose` on its parser; returns its default --out."""
    parser.add_argument("path", help="checkpoint: mi-krr run folder / .safetensors, or Garg run folder / .pt")
    parser.add_argument("--task", choices=("linear_regression", "gp_regression"), default=None,
                        help="task family to diagnose on (default: the checkpoint's own)")
    parser.add_argument("--n-support", type=int, default=None, help="support points per prompt (default: the training value)")
    parser.add_argument("--n-query", type=int, default=None, help="queries per prompt (default: the training value, Garg: 8)")
    parser.add_argument("--batch", type=int, default=64, help="prompts per task set (default: 64)")
    parser.add_argument("--lam", type=float, default=None, help="KRR ridge (default: the Bayes-optimal ridge of the task: noise variance for GP regression, "
                        "noise variance x d for linear regression; 0.01 for noiseless tasks)")
    parser.add_argument("--method", choices=("readout", "ridge"), default="readout",
                        help="layer predictions: the model's read-out lens, or ridge probes fitted on separate prompts")
    parser.add_argument("--bootstrap", type=int, default=1000, help="prompt resamples for intervals and the verdict (default: 1000)")
    parser.add_argument("--no-shifts", action="store_true", help="in-distribution prompts only")
    parser.add_argument("--shift-step-sizes", choices=("fitted", "optimal"), default="fitted",
                        help="step sizes on shifted prompts: one fitted global step per algorithm (default), or each prompt's optimal step (faster)")
    parser.add_argument("--no-sensitivities", action="store_true", help="skip label sensitivities d yhat / d y")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return DEFAULT_OUT


def diagnose_task_sets(
    model: Any,
    sets: dict[str, Any],
    *,
    lam: float | None,
    bootstrap: int,
    seed: int,
    method: str = "readout",
    train_task: Any = None,
    sensitivities: bool = True,
    progress: bool = True,
    kernels: tuple[str, ...] = ("exp", "gaussian"),
    shift_step_sizes: str = "fitted",
    **kwargs: Any,
):
    """`probes.diagnose` on in-distribution prompts (the first set) and shifts (the rest), with
    the expensive extra spent where it informs: label sensitivities on the first set only; the
    shifted sets get predictions, scores, verdict and the kernel alignment, with
    `shift_step_sizes` ("fitted": one cross-fitted global step per algorithm, as on the first set;
    "optimal": each prompt's spectrum-optimal step, much faster).
    Returns one `Diagnosis` holding every set."""
    from probes.diagnose import diagnose
    from probes.diagnosis import Diagnosis

    common = dict(lam=lam, bootstrap=bootstrap, seed=seed, method=method, train_task=train_task, progress=progress, **kwargs)
    first, *rest = sets
    result = diagnose(model, {first: sets[first]}, sensitivities=sensitivities, kernels=kernels, **common)
    settings = dict(result.settings, sensitivities=f"{first} only" if sensitivities and rest else sensitivities)
    task_sets = dict(result.task_sets)
    if rest:
        shifted = diagnose(model, {name: sets[name] for name in rest}, sensitivities=False, kernels=kernels,
                           step_sizes=shift_step_sizes, **common)
        task_sets.update(shifted.task_sets)
        settings["step_sizes"] = f"{result.settings['step_sizes']} on {first}, {shift_step_sizes} on shifts"
    return Diagnosis(task_sets=task_sets, settings=settings)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import torch

    from mi_krr._validation import offset_seed
    from mi_krr.checkpoints import load_checkpoint, task_sets
    from mi_krr.commands.overview import ModelEntry, overview_comparison, write_overview_report

    if args.batch < 2:
        raise ValueError(f"--batch must be >= 2, got {args.batch}: the fitted step sizes are cross-fitted on two halves of the prompts (and a verdict needs 20)")
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    loaded = load_checkpoint(args.path, device=args.device, task=args.task, n_support=args.n_support, n_query=args.n_query, lam=args.lam)
    sets, notes = task_sets(loaded.sampler, args.batch, loaded.n_support, loaded.n_query, seed=args.seed,
                            shifts=not args.no_shifts, label_scale=loaded.label_scale, model=loaded.model)
    train_task = None
    if args.method == "ridge":
        train_task, _ = task_sets(loaded.sampler, 4 * args.batch, loaded.n_support, loaded.n_query, seed=offset_seed(args.seed, 10_000),
                                  shifts=False, label_scale=loaded.label_scale)
        train_task = train_task["in_distribution"]
    diagnosis = diagnose_task_sets(loaded.model, sets, lam=loaded.lam, bootstrap=args.bootstrap, seed=args.seed, method=args.method,
                                   train_task=train_task, sensitivities=not args.no_sensitivities, progress=not args.no_progress,
                                   shift_step_sizes=args.shift_step_sizes)
    path = Path(loaded.path).resolve()  # "." and "./model.safetensors" name the folder they are in
    name = path.name if path.is_dir() else f"{path.parent.name}/{path.name}"
    description = (f"{loaded.format} checkpoint `{loaded.path}` ({loaded.model.n_layers} layers); prompts: {loaded.sampler.name}, "
                   f"n_support={loaded.n_support}, n_query={loaded.n_query}, {args.batch} per task set; method={args.method}.")
    for note in loaded.notes + notes:
        print(f"note: {note}")
    entry = ModelEntry(name, description, diagnosis)
    print(overview_comparison([entry]).summary())
    settings = {"path": loaded.path, "format": loaded.format, "batch": args.batch, "seed": args.seed, "device": args.device,
                "method": args.method, "bootstrap": args.bootstrap, "notes": loaded.notes + notes}
    index = write_overview_report([entry], args.out, title=f"mi-krr diagnose {loaded.path}", settings=settings)
    print(f"report: {index} ({time.perf_counter() - start:.0f} s)")
    return 0
