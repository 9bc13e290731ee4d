"""Task-level methods every mi-krr model class shares: encode a task for the model, its attention
mask, read query predictions, and the predictions a trainer scores. A model class supplies
`layout`, `causal`, `n_dims`, `max_seq_len` and `forward(tokens, n_support=None) -> [batch', seq]`;
this mixin does the rest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Protocol

import torch
from torch import nn

from mi_krr._repr import compact_repr
from mi_krr.models.encoding import EncodedPrompt, encode, interleave_pairs
from mi_krr.models.masks import allowed_attention
from mi_krr.tasks import ICLTask
from mi_krr.tasks.task import check_task

_N_SUPPORT_ATTRIBUTE = "mi_krr_n_support"
"""The attribute `encode` sets on its token tensor: the prompt's n_support, which the concat
layout's mask needs."""


@dataclass
class TrainingPredictions:
    """What a trainer scores on one batch.

    Attributes:
        pred: model predictions `[batch, k]`.
        target: the labels they predict `[batch, k]` (interleaved layout: y_support, one
            prediction per prefix; concat layout: y_query).
    """

    __repr__ = compact_repr

    pred: torch.Tensor
    target: torch.Tensor

    def mse(self) -> torch.Tensor:
        """Mean squared error over every prediction (a scalar in the autograd graph)."""
        return (self.pred - self.target).square().mean()


class SequenceModel(Protocol):
    """What `check_task_fits` reads of a model: its token layout, input dimension and longest
    sequence (None: no limit)."""

    @property
    def layout(self) -> str: ...

    @property
    def n_dims(self) -> int: ...

    @property
    def max_seq_len(self) -> int | None: ...


def encoded_length(layout: str, n_support: int, n_query: int) -> int:
    """Sequence length of one encoded prompt: n + m (concat) or 2n + 1 (interleaved)."""
    return n_support + n_query if layout == "concat" else 2 * n_support + 1


def check_task_fits(model: SequenceModel, task: ICLTask) -> None:
    """Raise one clear ValueError if `task`'s dimension is not the model's `n_dims` or its encoded
    query prompt (`encoded_length`) is longer than the model's `max_seq_len` (None: no limit)."""
    _check_task_dimension(model, task)
    _check_sequence_length(
        model,
        encoded_length(model.layout, task.n_support, task.n_query),
        f"the {model.layout} prompt for n_support={task.n_support}, n_query={task.n_query}",
    )


def _check_task_dimension(model: SequenceModel, task: ICLTask) -> None:
    """Raise one clear ValueError if `task` is not an `ICLTask` of the model's `n_dims`."""
    check_task("task", task)
    n_dims = model.n_dims
    if task.dim != n_dims:
        raise ValueError(
            f"task dimension d={task.dim} does not fit this model (n_dims={n_dims}): "
            f"sample tasks with d={n_dims} (zero-pad lower-dimensional inputs)"
        )


def _check_sequence_length(model: SequenceModel, length: int, sequence: str) -> None:
    """Raise one clear ValueError if `length` tokens (of the `sequence` it describes) exceed the
    model's `max_seq_len` (None: no limit)."""
    max_len = model.max_seq_len
    if max_len is not None and length > max_len:
        raise ValueError(
            f"{sequence} has {length} tokens, more than this model's max_seq_len={max_len}: use fewer support points "
            "(or, for a model you build, a larger max_seq_len in its config; a trained model has positions only up to it)"
        )


class PromptedModelMixin:
    """`encode`, `allowed_attention`, `predict`, `prefix_predictions`, `training_predictions` on
    top of `forward`.

    The concat layout's attention mask depends on how many support tokens a sequence starts with.
    `forward(tokens, n_support=None)` takes it explicitly; when omitted, `encode`'s tokens carry
    their own n_support (an attribute of the tensor `encode` returns), so
    `model.run_with_cache(model.encode(task).tokens)` works as in TransformerLens and prompts
    encoded earlier stay right after others were encoded. Other tensors (slices, copies) fall back
    on the lengths this model has encoded: a sequence length it encoded with one n_support only.
    The interleaved layout is causal and needs no n_support.
    """

    layout: str
    causal: bool
    n_dims: int
    _encoded_splits: dict[int, set[int]] | None = None  # sequence length -> every n_support encoded at it

    if TYPE_CHECKING:  # supplied by the model class (an attribute or a property) and its nn.Module

        @property
        def max_seq_len(self) -> int | None: ...

        def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

        def __call__(self, tokens: torch.Tensor, n_support: int | None = None) -> torch.Tensor: ...

    def _param_like(self) -> torch.Tensor:
        return next(self.parameters())

    def encode(self, task: ICLTask) -> EncodedPrompt:
        """Token sequences for `task` on the model's device and dtype (see `EncodedPrompt`)."""
        check_task_fits(self, task)
        reference = self._param_like()
        prompt = encode(task.to(device=reference.device, dtype=reference.dtype), self.layout)
        setattr(prompt.tokens, _N_SUPPORT_ATTRIBUTE, prompt.n_support)
        if self._encoded_splits is None:
            self._encoded_splits = {}
        self._encoded_splits.setdefault(prompt.tokens.shape[1], set()).add(prompt.n_support)
        return prompt

    @contextlib.contextmanager
    def encodes_unrecorded(self) -> Iterator[None]:
        """Within it, `encode` leaves no record of the splits it encodes (the record untagged
        tokens' n_support falls back on): the probes encode their own prompts under it, so
        running a probe never changes how the model runs a user's sliced tokens."""
        saved = None if self._encoded_splits is None else {length: set(splits) for length, splits in self._encoded_splits.items()}
        try:
            yield
        finally:
            self._encoded_splits = saved

    def allowed_attention(self, prompt: EncodedPrompt) -> torch.Tensor:
        """The mask the model applies to `prompt`'s token sequences: bool `[query_pos, key_pos]`,
        True where a token may attend to the key (`mi_krr.models.masks.allowed_attention` of the
        model's layout, for the prompt's length and n_support)."""
        return allowed_attention(self.layout, prompt.tokens.shape[1], prompt.n_support, self.causal, device=prompt.tokens.device)

    def _resolve_n_support(self, tokens: torch.Tensor, n_support: int | None) -> int | None:
        """The n_support the attention mask of `tokens` `[batch', seq, d_token]` needs: the
        argument, else the tokens' own (from `encode`), else the only one this
        model encoded at this length. Also checks the tokens' rank and dtype (the weights')."""
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be [batch, seq, d_token], got shape {tuple(tokens.shape)}")
        dtype = self._param_like().dtype
        if tokens.dtype != dtype:
            raise ValueError(f"tokens must be {dtype} like the model's weights, got {tokens.dtype}: build them with model.encode(task)")
        if self.layout == "interleaved":
            return None
        if n_support is not None:
            return n_support
        if hasattr(tokens, _N_SUPPORT_ATTRIBUTE):
            return getattr(tokens, _N_SUPPORT_ATTRIBUTE)
        seq_len = tokens.shape[1]
        seen = (self._encoded_splits or {}).get(seq_len, set())
        if len(seen) == 1:
            return next(iter(seen))
        reason = f"prompts of {seq_len} tokens were encoded with n_support in {sorted(seen)}" if seen else f"no prompt of {seq_len} tokens was encoded"
        raise ValueError(
            f"a concat-layout model needs to know how many of the {seq_len} tokens are support tokens and {reason}: "
            "pass n_support=prompt.n_support, or call the model on model.encode(task).tokens itself"
        )

    def predict(self, task: ICLTask) -> torch.Tensor:
        """Query predictions `[batch, n_query]`."""
        prompt = self.encode(task)
        return prompt.gather_queries(self(prompt.tokens, n_support=prompt.n_support))

    def prefix_predictions(self, task: ICLTask) -> torch.Tensor:
        """Interleaved layout only: predictions at every support x position `[batch, n_support]`;
        entry i predicts y_i from pairs 0..i-1 (Garg et al.'s `prediction[:, ::2]`).

        The model runs the 2 n_support tokens x_1, y_1, ..., x_n, y_n (no query token), so
        n_support may fill the positional table: 2 n_support <= max_seq_len (a Garg checkpoint's
        training length n_positions), one support point more than a query prompt takes."""
        if self.layout != "interleaved":
            raise ValueError(
                "prefix_predictions needs the causal interleaved layout; a concat model scores its "
                "queries: use predict(task) or training_predictions(task)"
            )
        _check_task_dimension(self, task)
        reference = self._param_like()
        task = task.to(device=reference.device, dtype=reference.dtype)
        pairs = interleave_pairs(task.x_support, task.y_support)  # [batch, 2 n_support, d]
        _check_sequence_length(self, pairs.shape[1], f"the interleaved support sequence x_1, y_1, ..., x_n, y_n for n_support={task.n_support}")
        return self(pairs)[:, 0::2]

    def training_predictions(self, task: ICLTask) -> TrainingPredictions:
        """Predictions and targets a trainer scores: every prefix of the support sequence against
        y_support (interleaved), or the queries against y_query (concat). Loss: `.mse()`."""
        if self.layout == "interleaved":
            target = task.y_support
            pred = self.prefix_predictions(task)
        else:
            target = task.y_query
            pred = self.predict(task)
        return TrainingPredictions(pred=pred, target=target.to(device=pred.device, dtype=pred.dtype))
