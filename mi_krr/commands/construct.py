"""`mi-krr construct {cg,richardson,gd}`: build a hand-made solver transformer, run it on sampled
well-conditioned prompts, and print its per-step error against the solver it implements and
against exact KRR.

    mi-krr construct cg --steps 8 --lam 0.1
    mi-krr construct cg --kernel exp --head-width 256 --steps 12
    mi-krr construct richardson --steps 10 --bandwidth 0.5 --lam 0.04
    mi-krr construct gd --steps 10 --save --out runs/gd_construction

cg: linear attention, CG on (K + lam I) alpha = y (linear kernel exactly; exp / gaussian through
a --head-width feature map phi, the solver then runs on Phi Phi^T); richardson: softmax attention,
row-sum preconditioned Richardson with a fixed step on a Gaussian kernel (default step: the
optimal one for the median prompt; with --mlp relu its ReLU products are sized for prompts of
--n-support points, `richardson_transformer(max_support=n_support)`); gd: one linear
self-attention layer per GD step on linear regression (default rate 1 / (mu_max(X^T X) + lam)).
Prompts: linear regression (N(0, I) inputs) for the linear kernel, GP regression with the chosen
kernel otherwise, label noise 0.1.

An option the chosen construction does not read is refused rather than ignored: --head-width is
cg's, --step richardson's and gd's, --mlp cg's and richardson's (--mlp-width with --mlp relu),
--bandwidth the Gaussian kernel's, --temperature the exp kernel's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

DEFAULT_OUT = "runs/construct"
CONSTRUCTIONS = ("cg", "richardson", "gd")
DEFAULT_STEPS = {"cg": 8, "richardson": 10, "gd": 10}


class _Options(TypedDict):
    bandwidth: float
    temperature: float
    mlp: str
    mlp_width: int


# The values of the options only some constructions read, where they do and none is given.
DEFAULT_OPTIONS: _Options = {"bandwidth": 1.0, "temperature": 1.0, "mlp": "exact", "mlp_width": 256}


def add_arguments(parser: argparse.ArgumentParser) -> str:
    """The options of `mi-krr construct` on its parser; returns its default --out."""
    parser.add_argument("construction", choices=CONSTRUCTIONS, help="which solver the transformer runs")
    parser.add_argument("--steps", type=int, default=None, help="solver steps T (default: cg 8, richardson 10, gd 10)")
    parser.add_argument("--lam", type=float, default=0.1, help="ridge lam (default: 0.1)")
    parser.add_argument("--kernel", choices=("linear", "exp", "gaussian"), default=None,
                        help="kernel (default: linear for cg and gd, gaussian for richardson)")
    parser.add_argument("--dim", type=int, default=4, help="input dimension d (default: 4)")
    parser.add_argument("--n-support", type=int, default=16, help="support points per prompt (default: 16)")
    parser.add_argument("--n-query", type=int, default=4, help="queries per prompt (default: 4)")
    parser.add_argument("--batch", type=int, default=8, help="prompts (default: 8)")
    parser.add_argument("--head-width", type=int, default=None, help="cg: feature-map width m (required for exp / gaussian)")
    # default None: an option is "given" only when passed, so one the construction does not read is refused
    parser.add_argument("--bandwidth", type=float, default=None, help="Gaussian kernel bandwidth (default: 1.0)")
    parser.add_argument("--temperature", type=float, default=None, help="exp kernel temperature (default: 1.0)")
    parser.add_argument("--step", type=float, default=None, help="richardson step w / gd learning rate (default: see above)")
    parser.add_argument("--mlp", choices=("exact", "relu"), default=None, help="cg, richardson: MLP arithmetic (default: exact)")
    parser.add_argument("--mlp-width", type=int, default=None, help="ReLU units per scalar operation with --mlp relu (default: 256)")
    parser.add_argument("--save", action="store_true", help="write the model (model.safetensors) and construction.json to --out")
    return DEFAULT_OUT


@dataclass
class ConstructionCheck:
    """A constructed model run against its solver and exact KRR on one batch of prompts.

    Attributes:
        construction, kernel, lam, n_layers, layers_per_step: what was built.
        params: the construction's parameters (step, head width, ...).
        task_info: the prompts' sampler configuration (and seed).
        steps: 0..T.
        error_vs_solver: per step, max |model - solver| over prompts and queries, divided by
            max |KRR prediction|.
        model_vs_krr, solver_vs_krr: per step, ||pred_t - KRR|| / ||KRR|| pooled over prompts
            and queries (KRR with the true kernel).
    """

    construction: str
    kernel: str
    lam: float
    n_layers: int
    layers_per_step: int
    params: dict[str, Any]
    task_info: dict[str, Any]
    steps: list[int]
    error_vs_solver: list[float]
    model_vs_krr: list[float]
    solver_vs_krr: list[float]
    model: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "model"}

    def table(self) -> str:
        """Per-step errors as text."""
        lines = [f"{'step':>4}  {'|model - solver|':>16}  {'model vs KRR':>12}  {'solver vs KRR':>13}"]
        for step, a, b, c in zip(self.steps, self.error_vs_solver, self.model_vs_krr, self.solver_vs_krr):
            lines.append(f"{step:>4}  {a:>16.3e}  {b:>12.3e}  {c:>13.3e}")
        return "\n".join(lines)


def check_construction(
    construction: str,
    n_steps: int | None = None,
    lam: float = 0.1,
    kernel: str | None = None,
    dim: int = 4,
    n_support: int = 16,
    n_query: int = 4,
    batch: int = 8,
    head_width: int | None = None,
    bandwidth: float | None = None,
    temperature: float | None = None,
    step: float | None = None,
    mlp: str | None = None,
    mlp_width: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> ConstructionCheck:
    """Build the construction (module docstring), sample prompts with `seed` (float64), and
    compare its per-step predictions with its solver (`mi_krr.solvers`) and exact KRR.

    None for an option: its default (`DEFAULT_OPTIONS`; for `step` see the module docstring).
    A non-None option the construction does not read with `kernel` is a ValueError."""
    import torch

    from mi_krr._validation import check_choice, check_count, check_positive
    from mi_krr.construct import cg_transformer, gd_transformer, richardson_transformer
    from mi_krr.feature_maps import FeatureMap
    from mi_krr.kernels import kernel_matrix
    from mi_krr.solvers import cg, feature_gd, krr, richardson
    from mi_krr.tasks import GPRegressionSampler, LinearRegressionSampler, Sampler

    check_choice("construction", construction, CONSTRUCTIONS)
    kernel = kernel or ("gaussian" if construction == "richardson" else "linear")
    if construction == "richardson" and kernel != "gaussian":
        raise ValueError(f"the richardson construction runs on the Gaussian kernel (softmax gives D^-1 K): drop --kernel {kernel}")
    if construction == "gd" and kernel != "linear":
        raise ValueError(f"the gd construction runs on linear regression: drop --kernel {kernel} (or use cg with --head-width)")
    refuse_unread_options(construction, kernel, {"head_width": head_width, "bandwidth": bandwidth, "temperature": temperature,
                                                 "step": step, "mlp": mlp, "mlp_width": mlp_width})
    bandwidth = DEFAULT_OPTIONS["bandwidth"] if bandwidth is None else bandwidth
    temperature = DEFAULT_OPTIONS["temperature"] if temperature is None else temperature
    mlp = DEFAULT_OPTIONS["mlp"] if mlp is None else mlp
    mlp_width = DEFAULT_OPTIONS["mlp_width"] if mlp_width is None else mlp_width
    n_steps = check_count("steps", DEFAULT_STEPS[construction] if n_steps is None else n_steps, minimum=1)
    if construction == "gd" and lam == 0:
        raise ValueError("lam must be > 0 here: the check compares with kernel ridge regression at lam; plain least-squares GD "
                         "(lam = 0) is mi_krr.construct.gd_transformer(n_steps, lr) in Python")
    lam = check_positive("lam", lam)
    for name, value in (("dim", dim), ("n_support", n_support), ("n_query", n_query), ("batch", batch)):
        check_count(name, value, minimum=1)
    sampler: Sampler
    params: dict[str, float]
    if kernel == "linear":
        sampler = LinearRegressionSampler(dim, noise_std=0.1)
        params = {}
    else:
        sampler = GPRegressionSampler(dim, kernel=kernel, bandwidth=bandwidth, temperature=temperature, noise_std=0.1)
        params = sampler.kernel_params()
    task = sampler.sample(batch, n_support, n_query, seed=seed, dtype=torch.float64)
    x, xq, y = task.x_support, task.x_query, task.y_support
    K, K_query = kernel_matrix(kernel, x, None, **params), kernel_matrix(kernel, xq, x, **params)

    if construction == "cg":
        model = cg_transformer(n_steps, lam, kernel=kernel, dim=dim, head_width=head_width, temperature=params.get("temperature"),
                               bandwidth=params.get("bandwidth"), mlp=mlp, mlp_width=mlp_width, seed=seed, device=device)
        feature_map = model.feature_map
        assert isinstance(feature_map, FeatureMap)  # built from `kernel`: a pointwise map
        phi, phi_query = feature_map(x), feature_map(xq)
        solver = cg(phi @ phi.mT, y, lam, n_steps, K_query=phi_query @ phi.mT).pred
    elif construction == "richardson":
        step = rowsum_optimal_step(K, lam) if step is None else check_positive("step", step)
        model = richardson_transformer(n_steps, lam, bandwidth=bandwidth, step=step, dim=dim, mlp=mlp, mlp_width=mlp_width,
                                       max_support=n_support, device=device)
        solver = richardson(K, y, lam, n_steps, step=step, precond="rowsum", K_query=K_query).pred
    else:
        gram = x.mT @ x
        step = float(1.0 / (torch.linalg.eigvalsh(gram)[..., -1].max() + lam)) if step is None else check_positive("step", step)
        model = gd_transformer(n_steps, lr=step, lam=lam, dim=dim, device=device)
        solver = feature_gd(x, y, lam, n_steps, step=step, X_query=xq).pred
    assert solver is not None  # each solver was given the queries
    model_pred = model.step_states(task.to(device=device)).pred.detach().cpu().to(torch.float64)
    exact = torch.einsum("bmn,bn->bm", K_query, krr(K, y, lam))[:, None]
    scale = exact.abs().max()

    def relative(pred: torch.Tensor) -> list[float]:
        return ((pred - exact).pow(2).sum(dim=(0, 2)).sqrt() / exact.pow(2).sum().sqrt()).tolist()

    return ConstructionCheck(
        construction=construction,
        kernel=kernel,
        lam=lam,
        n_layers=model.n_layers,
        layers_per_step=model.layers_per_step,
        params={key: value for key, value in model.params.items() if isinstance(value, (int, float, str, bool)) or value is None},
        task_info={key: value for key, value in task.info.items() if isinstance(value, (int, float, str, bool)) or value is None},
        steps=list(range(n_steps + 1)),
        error_vs_solver=((model_pred - solver).abs().amax(dim=(0, 2)) / scale).tolist(),
        model_vs_krr=relative(model_pred),
        solver_vs_krr=relative(solver),
        model=model,
    )


def option_readers(construction: str, kernel: str, mlp: str | None) -> dict[str, tuple[str, bool]]:
    """For each option only some constructions read: the constructions that read it (as the
    command line spells them) and whether `construction` on `kernel` with `mlp` does."""
    has_reciprocal_mlps = construction in ("cg", "richardson")
    return {
        "head_width": ("cg", construction == "cg"),
        "step": ("richardson, gd", construction in ("richardson", "gd")),
        "mlp": ("cg, richardson", has_reciprocal_mlps),
        "mlp_width": ("cg --mlp relu, richardson --mlp relu", has_reciprocal_mlps and mlp == "relu"),
        "bandwidth": ("richardson, cg --kernel gaussian", kernel == "gaussian"),
        "temperature": ("cg --kernel exp", kernel == "exp"),
    }


def refuse_unread_options(construction: str, kernel: str, given: dict[str, Any]) -> None:
    """ValueError naming the first option in `given` (option -> value, None: not given) that
    `construction` on `kernel` would ignore, and the constructions that read it."""
    readers = option_readers(construction, kernel, given.get("mlp"))
    for name, value in given.items():
        used_by, read = readers[name]
        if value is not None and not read:
            raise ValueError(f"construct {construction} does not use --{name.replace('_', '-')} (used by: {used_by}): drop it")


def rowsum_optimal_step(K: Any, lam: float) -> float:
    """Median over prompts of the optimal Richardson step 2 / (mu_min + mu_max) of
    D^-1/2 (K + lam I) D^-1/2, D = diag(K 1), for kernel matrices `K [batch, n, n]` (the
    row-sum preconditioned system's spectrum)."""
    import torch

    root = K.sum(-1).sqrt()
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    eigenvalues = torch.linalg.eigvalsh((K + lam * eye) / root[..., :, None] / root[..., None, :])
    return float((2.0 / (eigenvalues[..., 0] + eigenvalues[..., -1])).median())


def construction_keywords(arguments: dict[str, Any]) -> dict[str, Any]:
    """`check_construction`'s keywords from the command's arguments (`vars(args)`, as
    construction.json records them)."""
    renamed = {"steps": "n_steps"}
    keywords = ("construction", "steps", "lam", "kernel", "dim", "n_support", "n_query", "batch", "head_width", "bandwidth",
                "temperature", "step", "mlp", "mlp_width", "seed", "device")
    return {renamed.get(key, key): arguments[key] for key in keywords}


def load_construction(folder: Any, device: str = "cpu"):
    """The model `mi-krr construct ... --save --out FOLDER` wrote, on `device`: rebuilt from
    construction.json's arguments (the same prompts, hence the same data-dependent defaults such as
    richardson's step), then its model.safetensors weights loaded (strictly; a build with other
    embedding features is refused)."""
    from pathlib import Path

    import safetensors.torch

    folder = Path(folder)
    files = [folder / "construction.json", folder / "model.safetensors"]
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} does not exist: pass the --out folder of `mi-krr construct ... --save`")
    rerun = "save it again with `mi-krr construct ... --save`"
    try:
        arguments = json.loads(files[0].read_text())["arguments"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{files[0]} is not a construction record ({type(error).__name__}: {error}): {rerun}") from None
    model = check_construction(**{**construction_keywords(arguments), "device": device}).model
    try:
        weights = safetensors.torch.load_file(str(files[1]), device=str(device))
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"{files[1]} is not a readable safetensors file ({error}): {rerun}") from None
    model.load_state_dict(weights)
    return model


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    result = check_construction(**construction_keywords(vars(args)))
    print(f"{result.construction} transformer: {result.n_layers} blocks ({result.layers_per_step} per step), kernel {result.kernel}, "
          f"lam={result.lam:g}; {args.batch} prompts, n_support={args.n_support}, n_query={args.n_query}, seed={args.seed}")
    print(result.table())
    final = result.steps[-1]
    print(f"max |model - solver| over steps: {max(result.error_vs_solver):.3e} (relative to max |KRR|); "
          f"model vs KRR after {final} steps: {result.model_vs_krr[-1]:.3e}")
    if args.save:
        import safetensors.torch

        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        # each step's blocks share the first step's tensors; safetensors stores each name's own copy
        weights = {name: value.detach().cpu().clone() for name, value in result.model.state_dict().items()}
        safetensors.torch.save_file(weights, str(folder / "model.safetensors"))
        recipe = {"command": "mi-krr construct", "arguments": {key: value for key, value in vars(args).items() if key != "debug"},
                  **result.to_dict()}
        (folder / "construction.json").write_text(json.dumps(recipe, indent=1))
        print(f"saved: {folder / 'model.safetensors'}, {folder / 'construction.json'} "
              f"(reload: mi_krr.commands.construct.load_construction({str(folder)!r}))")
    return 0
