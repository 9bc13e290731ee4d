"""`mi-krr demo`: the whole instrument on four models, on a laptop CPU, offline.

    mi-krr demo                    # full demo, report in reports/demo (11 s wall on an idle 2-core machine, ~1 min under load)
    mi-krr demo --quick            # the same on smaller batches (9 s wall idle, mostly start-up; what the test runs)

Diagnoses (`probes.diagnose`) four models and writes one report:
  - cg_construction: a hand-built linear-attention transformer running conjugate gradient
    (4 blocks per step) on linear-regression prompts: positive control, must be identified as cg;
  - richardson_construction: a hand-built softmax transformer running row-sum preconditioned
    Richardson with a fixed step (3 blocks per step) on Gaussian-kernel GP prompts;
  - linear_lr: the shipped linear-attention model trained on noisy linear regression
    (checkpoints/linear_lr), in distribution and under each applicable shift;
  - softmax_gp: the shipped softmax model trained on Gaussian-kernel GP regression
    (checkpoints/softmax_gp), in distribution and under each applicable shift.
Constructed models are probed at their step boundaries (every layers_per_step blocks), where
their state is complete. Label sensitivities d yhat / d y (the slowest stage) are left out unless
--sensitivities is given; `mi-krr diagnose PATH` computes them by default. Step sizes of GD,
Richardson and heavy ball: one cross-fitted global step per algorithm (`probes.step_sizes`) on
in-distribution prompts, each prompt's spectrum-optimal step on the shifts (the fit is the
costliest stage; `mi-krr diagnose` fits on every set). Prints the summary
table; writes index.md, overview.png, per-model figures and report.json (every number) to --out.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUT = "reports/demo"
SHIPPED = ("linear_lr", "softmax_gp")


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run.

    Attributes:
        batch: prompts per task set of a trained model; construction_batch for the constructions.
        bootstrap: prompt resamples for intervals and verdicts.
        shifts: None (every applicable shift of DEFAULT_SHIFTS) or the names to keep.
        cg_steps, richardson_steps: iterations the constructions run.
    """

    batch: int
    construction_batch: int
    bootstrap: int
    shifts: tuple[str, ...] | None
    cg_steps: int = 6
    richardson_steps: int = 5


FULL = DemoSettings(batch=64, construction_batch=32, bootstrap=1000, shifts=None)
QUICK = DemoSettings(batch=16, construction_batch=24, bootstrap=100, shifts=("input_scale_x2", "longer_prompts_x2"), cg_steps=3, richardson_steps=3)


def add_arguments(parser: argparse.ArgumentParser) -> str:
    """The options of `mi-krr demo` on its parser; returns its default --out."""
    parser.add_argument("--quick", action="store_true",
                        help="smaller batches, two shifts, shorter constructions (the same code path; for tests)")
    parser.add_argument("--checkpoints", default=None,
                        help="folder holding the shipped runs linear_lr/ and softmax_gp/ (default: checkpoints/ in the working directory or a parent of it, else the repository's)")
    parser.add_argument("--sensitivities", action="store_true",
                        help="also compare label sensitivities d yhat / d y on the trained models' in-distribution prompts (about +1 min)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return DEFAULT_OUT


def run(args: argparse.Namespace) -> int:
    import time
    from functools import partial

    import torch
    from tqdm.auto import tqdm

    from mi_krr.checkpoints import shipped_checkpoint
    from mi_krr.commands.overview import overview_comparison, write_overview_report

    start = time.perf_counter()
    settings = QUICK if args.quick else FULL
    paths = {name: shipped_checkpoint(name, args.checkpoints) for name in SHIPPED}
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    common = dict(settings=settings, seed=args.seed, device=args.device, progress=progress)
    builders = {
        "cg_construction": lambda: cg_construction_entry(**common),
        "richardson_construction": lambda: richardson_construction_entry(**common),
        **{name: partial(shipped_entry, paths[name], name, sensitivities=args.sensitivities, **common) for name in SHIPPED},
    }
    entries = []
    with tqdm(builders.items(), desc="demo", unit="model", disable=not progress) as bar:
        for name, build in bar:
            bar.set_postfix_str(name)
            entries.append(build())
    print(overview_comparison(entries).summary())
    report_settings = {"mode": "quick" if args.quick else "full", "seed": args.seed, "device": args.device,
                       "sensitivities": "trained models, in distribution" if args.sensitivities else "off",
                       "batch": settings.batch, "construction_batch": settings.construction_batch,
                       "bootstrap": settings.bootstrap, "checkpoints": {name: str(path) for name, path in paths.items()}}
    index = write_overview_report(entries, args.out, title="mi-krr demo", settings=report_settings)
    print(f"report: {index} ({time.perf_counter() - start:.0f} s)")
    return 0


def cg_construction_entry(settings: DemoSettings, seed: int, device: str, progress: bool):
    """The CG transformer on linear-regression prompts (d = 8, n = 16, input condition number
    20, lam = 0.05): CG has not converged after `cg_steps` steps, so its trajectory is informative."""
    from mi_krr.commands.diagnose import diagnose_task_sets
    from mi_krr.commands.overview import ModelEntry
    from mi_krr.construct import cg_transformer
    from mi_krr.tasks import LinearRegressionSampler

    lam, dim = 0.05, 8
    model = cg_transformer(n_steps=settings.cg_steps, lam=lam, dim=dim, device=device)
    task = LinearRegressionSampler(dim, condition_number=20.0, noise_std=0.1).sample(settings.construction_batch, 16, 4, seed=seed)
    diagnosis = diagnose_task_sets(model, {"in_distribution": task}, lam=lam, bootstrap=settings.bootstrap, seed=seed,
                                   layers=_step_boundaries(model), n_steps=2 * settings.cg_steps, kernels=(), sensitivities=False,
                                   progress=progress)
    description = (f"Constructed CG transformer: {settings.cg_steps} CG steps x {model.layers_per_step} linear-attention blocks, "
                   f"lam={lam}; linear-regression prompts (d={dim}, n=16, input condition number 20); probed at step boundaries.")
    return ModelEntry("cg_construction", description, diagnosis)


def richardson_construction_entry(settings: DemoSettings, seed: int, device: str, progress: bool):
    """The Richardson transformer on the shipped softmax model's GP prompts (d = 2, bandwidth 0.5,
    lam = noise variance 0.04) with one fixed step: the row-sum preconditioned system's optimal
    step for the median prompt. The candidates add that fixed-step solver to the defaults."""
    from functools import partial

    from mi_krr.commands.construct import rowsum_optimal_step
    from mi_krr.commands.diagnose import diagnose_task_sets
    from mi_krr.commands.overview import ModelEntry
    from mi_krr.construct import richardson_transformer
    from mi_krr.kernels import kernel_matrix
    from mi_krr.solvers import ALGORITHMS, richardson
    from mi_krr.tasks import GPRegressionSampler
    from probes.diagnose import DEFAULT_ALGORITHMS

    bandwidth, noise = 0.5, 0.2
    lam = noise**2
    task = GPRegressionSampler(2, kernel="gaussian", bandwidth=bandwidth, noise_std=noise).sample(settings.construction_batch, 24, 8, seed=seed)
    step = rowsum_optimal_step(kernel_matrix("gaussian", task.x_support.double(), bandwidth=bandwidth), lam)
    model = richardson_transformer(n_steps=settings.richardson_steps, lam=lam, bandwidth=bandwidth, step=step, dim=2, device=device)
    fixed = f"richardson_rowsum(w={step:.3g})"
    algorithms = {fixed: partial(richardson, step=step, precond="rowsum"), **{name: ALGORITHMS[name] for name in DEFAULT_ALGORITHMS}}
    diagnosis = diagnose_task_sets(model, {"in_distribution": task}, lam=lam, bootstrap=settings.bootstrap, seed=seed,
                                   algorithms=algorithms, layers=_step_boundaries(model), n_steps=3 * settings.richardson_steps,
                                   sensitivities=False, progress=progress)
    description = (f"Constructed Richardson transformer: {settings.richardson_steps} steps x {model.layers_per_step} softmax blocks, "
                   f"row-sum preconditioner, fixed step w={step:.3g}, lam={lam:g}; Gaussian-kernel GP prompts (d=2, bandwidth "
                   f"{bandwidth}, n=24); probed at step boundaries. Candidates: the defaults plus {fixed}.")
    return ModelEntry("richardson_construction", description, diagnosis)


def shipped_entry(path: Path, name: str, settings: DemoSettings, seed: int, device: str, progress: bool,
                  sensitivities: bool = False):
    """A shipped checkpoint, in distribution and under its applicable shifts (label sensitivities
    on the in-distribution set when `sensitivities`)."""
    from mi_krr.checkpoints import load_checkpoint, task_sets
    from mi_krr.commands.diagnose import diagnose_task_sets
    from mi_krr.commands.overview import ModelEntry

    loaded = load_checkpoint(path, device=device)
    sets, notes = task_sets(loaded.sampler, settings.batch, loaded.n_support, loaded.n_query, seed=seed, model=loaded.model)
    if settings.shifts is not None:
        sets = {key: task for key, task in sets.items() if key == "in_distribution" or key in settings.shifts}
    diagnosis = diagnose_task_sets(loaded.model, sets, lam=loaded.lam, bootstrap=settings.bootstrap, seed=seed,
                                   sensitivities=sensitivities, shift_step_sizes="optimal", progress=progress)
    for note in notes:
        diagnosis.task_sets["in_distribution"].notes.append(note)
    config = loaded.model.cfg if hasattr(loaded.model, "cfg") else None
    architecture = f"{config.n_layers} layers, {config.n_heads} heads, d_model {config.d_model}, {config.attention} attention" if config else ""
    description = (f"Shipped checkpoint `{path}` ({architecture}); prompts: {loaded.sampler.name} "
                   f"(n_support={loaded.n_support}, n_query={loaded.n_query}), {settings.batch} per task set; "
                   f"task sets: {', '.join(sets)}.")
    return ModelEntry(name, description, diagnosis)


def _step_boundaries(model) -> list[int]:
    """Residual indices 0, s, 2 s, ..., L of a constructed model with s = layers_per_step."""
    return list(range(0, model.n_layers + 1, model.layers_per_step))
