"""Run the three construction studies, print their numbers, and write docs/figures/*.png.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/construction_figures.py [--out docs/figures] [--only construct_width]

(The studies are thousands of small tensor ops; one intra-op thread is fastest on a shared machine.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def width_table(study) -> str:
    """One line per curve: kernel, head, ridge, d_eff, error +- s.e. per width, and the largest
    |model - KRR on the head's kernel| (0 when the model's CG has converged)."""
    lines = [f"widths m: {study.widths}  (prompts: n={study.n_support} + {study.n_query} queries, {study.n_steps} CG steps)"]
    for curve in study.curves:
        errors = "  ".join(f"{e:.3g}+-{s:.1g}" for e, s in zip(curve.error, curve.error_sem))
        gap = max(abs(a - b) for a, b in zip(curve.error, curve.feature_krr_error))
        lines.append(f"{curve.kernel:6s} {curve.head:15s} lam={curve.lam:<5g} d_eff={curve.d_eff:5.1f} | {errors} | gap {gap:.1g}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "figures")
    parser.add_argument("--only", nargs="*", default=None, help="figure names to (re)make (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    from mi_krr.construct.studies import cg_rate_study, relu_width_study, width_study

    studies = {
        # lam = 1 puts d_eff well below n for both kernels (linear 12 of d = 16, exp 32 of n = 64);
        # lams 0.1 and 10 move d_eff for the m / d_eff panels.
        "construct_width": lambda: width_study(widths=(2, 4, 8, 16, 32, 64, 128), n_support=64, n_query=16, lam=1.0,
                                               lams=(0.1, 10.0), n_steps=48, batch_size=10, n_seeds=2),
        "construct_cg_rate": lambda: cg_rate_study(kappas=(10.0, 100.0, 1000.0), n_support=64, n_steps=40, batch_size=16),
        "construct_relu_width": relu_width_study,
    }
    for name, run in studies.items():
        if args.only is not None and name not in args.only:
            continue
        start = time.perf_counter()
        study = run()
        elapsed = time.perf_counter() - start
        figure = study.plot()
        path = args.out / f"{name}.png"
        figure.savefig(path, dpi=90)
        print(f"== {name} ({elapsed:.1f} s) -> {path} ({path.stat().st_size / 1024:.0f} KB)")
        if name == "construct_width":
            print(width_table(study))
        else:
            print(json.dumps(study.to_dict(), indent=None, default=float)[:4000])


if __name__ == "__main__":
    main()
