"""`mi-krr reproduce NAME`: run one of the project's reproductions (or all of them), print its key
numbers, and write NAME.png and NAME.json to --out (default reports/reproduce/NAME; with `all`,
--out DIR holds one folder per reproduction).

    mi-krr reproduce cg-rate              # CG transformer vs the CG bound
    mi-krr reproduce width                # error to oracle KRR vs head width, beside d_eff
    mi-krr reproduce softmax-ood          # softmax attention vs exp kernel, in and out of distribution
    mi-krr reproduce richardson-profile   # softmax GP model vs preconditioned Richardson and the rest
    mi-krr reproduce all --out reports/reproduce

The same functions are in `mi_krr.reproductions` for notebooks. --quick runs each in a small
configuration (seconds); with --checkpoint, softmax-ood's quick run measures the quick shifts
that apply to that checkpoint's task (a linear-regression task has no bandwidth to shift).
--device and --seed reach every reproduction.
"""

from __future__ import annotations

import argparse

NAMES = ("cg-rate", "width", "softmax-ood", "richardson-profile")
DEFAULT_OUT = "reports/reproduce/NAME"  # NAME: replaced by each reproduction's name
CHECKPOINT_REPRODUCTIONS = ("softmax-ood", "richardson-profile")


def add_arguments(parser: argparse.ArgumentParser) -> str:
    """The options of `mi-krr reproduce` on its parser; returns its default --out."""
    parser.add_argument("name", choices=(*NAMES, "all"), help="which reproduction")
    parser.add_argument("--quick", action="store_true", help="small configuration (seconds)")
    parser.add_argument("--checkpoint", default=None,
                        help="softmax-ood / richardson-profile: the model (default: the shipped checkpoints/softmax_gp)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return DEFAULT_OUT


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from mi_krr.reproductions import reproduction
    from mi_krr.reproductions.softmax_ood import applicable_quick_shifts
    from probes.diagnosis import strict_json

    names = NAMES if args.name == "all" else (args.name,)
    if args.checkpoint is not None and not set(names) & set(CHECKPOINT_REPRODUCTIONS):
        raise ValueError(f"reproduce {args.name} reads no checkpoint (only {', '.join(CHECKPOINT_REPRODUCTIONS)} do): drop --checkpoint")
    for name in tqdm(names, desc="reproduce", disable=args.no_progress or len(names) == 1):
        function, quick = reproduction(name)
        kwargs = dict(quick) if args.quick else {}
        kwargs.update(seed=args.seed, device=args.device)
        if name in CHECKPOINT_REPRODUCTIONS:
            kwargs.update(checkpoint=args.checkpoint, progress=not args.no_progress)
        if args.quick and name == "softmax-ood" and args.checkpoint is not None:
            kwargs["shifts"] = applicable_quick_shifts(args.checkpoint)
        start = time.perf_counter()
        result = function(**kwargs)
        seconds = time.perf_counter() - start
        if args.out == DEFAULT_OUT:
            folder = Path(DEFAULT_OUT.replace("NAME", name))
        else:
            folder = Path(args.out) / name if args.name == "all" else Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        figure = result.plot()
        figure.savefig(folder / f"{name}.png", dpi=90, bbox_inches="tight")
        plt.close(figure)
        document = {"name": name, "quick": args.quick, "seconds": seconds, "key_numbers": result.key_numbers(), "result": result.to_dict()}
        (folder / f"{name}.json").write_text(json.dumps(strict_json(document), indent=1, default=str, allow_nan=False))  # NaN / inf: null
        print(f"== {name} ({seconds:.1f} s)")
        print(result.summary())
        print(f"wrote {folder / (name + '.png')}, {folder / (name + '.json')}")
    return 0
