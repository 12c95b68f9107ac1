"""Small real models on scikit-learn's bundled digits: the embedded default of ``make demo`` / ``repsim demo``,
and the trained networks the examples and tests use (no download: the 1,797 8x8 images ship with scikit-learn).

Training runs once per process per (architecture, seed): the trained weights are cached with ``functools.cache``, and
every call builds a *fresh* module from them, so code that modifies its model cannot leak into another caller.
Data are 8x8 grey images scaled to [0, 1], shaped (n, 1, 8, 8) float32, with a fixed stratified split
(1347 train / 450 test). Training runs on one thread and is deterministic for a given seed.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from ._utils.checks import SEED, AnyOf, Float, Int, check_params

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
ModelT = TypeVar("ModelT", bound=nn.Module)

#: Name of the last hidden layer (post-ReLU, 64 units) in both architectures.
PENULTIMATE = "relu3"

#: The options of :func:`load_digits_split` (``test_size`` as scikit-learn reads it: a fraction or a count).
LOAD_DIGITS_SPLIT_PARAMS = {
    "split_seed": Int(minimum=0, maximum=2**32 - 1),
    "test_size": AnyOf((Float(positive=True, below=1.0), Int(minimum=1)), "a fraction in (0, 1) or a count >= 1"),
}
#: The options of :func:`train_digits_cnn` and :func:`train_digits_mlp`.
TRAIN_DIGITS_PARAMS = {"seed": SEED}


@functools.cache
def _digits_numpy(split_seed: int, test_size: float) -> tuple[np.ndarray, ...]:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn ships with the 'all' extra
        from .errors import RepsimError

        raise RepsimError("the digits data ship with scikit-learn: pip install scikit-learn") from exc

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # (1797, 1, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    return tuple(
        train_test_split(images, labels, test_size=test_size, random_state=split_seed, stratify=labels)
    )  # Xtr, Xte, ytr, yte


def load_digits_split(split_seed: int = 0, test_size: float = 0.25) -> Split:
    """``(Xtr, ytr, Xte, yte)``: images (n, 1, 8, 8) float32 in [0, 1] and int64 labels; fresh tensors each call."""
    check_params(LOAD_DIGITS_SPLIT_PARAMS, split_seed=split_seed, test_size=test_size)
    Xtr, Xte, ytr, yte = _digits_numpy(split_seed, test_size)
    return (torch.tensor(Xtr), torch.tensor(ytr), torch.tensor(Xte), torch.tensor(yte))


def build_digits_cnn() -> nn.Sequential:
    """conv1 (1->16, 3x3) relu1 conv2 (16->32, 3x3) relu2 flatten fc1 (512->64) relu3 (penultimate) fc2 (64->10)."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 3),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3),
            relu2=nn.ReLU(),
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 4 * 4, 64),
            relu3=nn.ReLU(),
            fc2=nn.Linear(64, 10),
        )
    )


def build_digits_mlp() -> nn.Sequential:
    """flatten fc1 (64->128) relu1 fc2 (128->64) relu3 (penultimate) fc3 (64->10), on the same (n, 1, 8, 8) images."""
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(64, 128),
            relu1=nn.ReLU(),
            fc2=nn.Linear(128, 64),
            relu3=nn.ReLU(),
            fc3=nn.Linear(64, 10),
        )
    )


def _train(build: Callable[[], nn.Module], seed: int, epochs: int, lr: float, batch: int) -> dict[str, torch.Tensor]:
    """Train on one thread (see below) and return a copy of the trained state dict."""
    # These models are tiny: intra-op parallelism does not pay, and when other processes share the CPUs, OpenMP
    # threads spin-waiting on each other made 2-thread training 5-20x slower than 1 thread (measured: 0.5 s
    # against 5-24 s). One thread also makes the weights independent of the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_single_thread(build, seed, epochs, lr, batch)
    finally:
        torch.set_num_threads(threads)


def _train_single_thread(
    build: Callable[[], nn.Module], seed: int, epochs: int, lr: float, batch: int
) -> dict[str, torch.Tensor]:
    """AdamW + cosine schedule, cross-entropy, shuffled minibatches; deterministic for a given seed."""
    Xtr, ytr, _, _ = load_digits_split()
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = build()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(Xtr) // batch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(Xtr), generator=generator)
        for idx in order.split(batch):
            _step(model, optimizer, Xtr[idx], ytr[idx])
            scheduler.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor) -> None:
    """One optimisation step on the cross-entropy of a minibatch."""
    loss = nn.functional.cross_entropy(model(X), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@functools.cache
def _cnn_state(seed: int) -> dict[str, torch.Tensor]:
    return _train(build_digits_cnn, seed, epochs=10, lr=1e-2, batch=128)


@functools.cache
def _mlp_state(seed: int) -> dict[str, torch.Tensor]:
    return _train(build_digits_mlp, seed, epochs=20, lr=1e-2, batch=128)


def _fresh(build: Callable[[], ModelT], state: dict[str, torch.Tensor]) -> ModelT:
    model = build()
    model.load_state_dict(state)
    return model.eval()


def train_digits_cnn(seed: int = 0) -> tuple[nn.Sequential, Split]:
    """A trained digits CNN (eval mode, float32) and the split ``(Xtr, ytr, Xte, yte)``; trained once per seed."""
    check_params(TRAIN_DIGITS_PARAMS, seed=seed)
    return _fresh(build_digits_cnn, _cnn_state(seed)), load_digits_split()


def train_digits_mlp(seed: int = 0) -> tuple[nn.Sequential, Split]:
    """A trained digits MLP (eval mode, float32) and the split ``(Xtr, ytr, Xte, yte)``; trained once per seed."""
    check_params(TRAIN_DIGITS_PARAMS, seed=seed)
    return _fresh(build_digits_mlp, _mlp_state(seed)), load_digits_split()


@torch.no_grad()
def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(X, y)``."""
    return float((model(X).argmax(dim=1) == y).double().mean())


@torch.no_grad()
def hidden(model: nn.Sequential, X: torch.Tensor, upto: str = PENULTIMATE) -> torch.Tensor:
    """Output of the child named ``upto`` (inclusive), flattened to (n, features): e.g. the penultimate layer."""
    names = [name for name, _ in model.named_children()]
    if upto not in names:
        raise KeyError(f"no layer {upto!r}; layers are {names}")
    out = model[: names.index(upto) + 1](X)
    return out.reshape(out.shape[0], -1)
