"""Run the three construction studies, print their numbers, and write docs/figures/*.png.

    .venv/bin/python scripts/construction_figures.py [--out docs/figures]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "figures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    from mi_krr.construct.studies import cg_rate_study, relu_width_study, width_study

    studies = {
        "construct_width": lambda: width_study(widths=(2, 4, 8, 16, 32, 64, 128, 256), n_support=64, n_steps=48, batch_size=8),
        "construct_cg_rate": lambda: cg_rate_study(kappas=(10.0, 100.0, 1000.0), n_support=64, n_steps=40, batch_size=16),
        "construct_relu_width": lambda: relu_width_study(widths=(16, 32, 64, 128, 256, 512, 1024, 2048)),
    }
    for name, run in studies.items():
        start = time.perf_counter()
        study = run()
        elapsed = time.perf_counter() - start
        figure = study.plot()
        path = args.out / f"{name}.png"
        figure.savefig(path, dpi=90)
        print(f"== {name} ({elapsed:.1f} s) -> {path} ({path.stat().st_size / 1024:.0f} KB)")
        print(json.dumps(study.to_dict(), indent=None, default=float)[:4000])


if __name__ == "__main__":
    main()
