"""Train the same small CNN on scikit-learn's digits twice: torch vs dlkernels.

    python examples/train_digits.py [--epochs 15] [--batch-size 64] [--seed 0] [--out examples/train_digits.png]

The data set is bundled with scikit-learn (1797 8x8 grey images of 0-9, no download); 25% is held
out for testing. Images are preprocessed once with dlkernels.nn.GlobalContrastNorm (the book's
setting for closely cropped images, lam=0, eps=1e-8), the same for both runs.

The model: three Conv -> BatchNorm -> LeakyReLU -> Dropout blocks and a linear classifier.

- torch: torch.nn modules, torch.optim.Adam and torch.nn.utils.clip_grad_norm_;
- dlkernels: ``dlkernels.fuse`` of the same model (BatchNorm -> LeakyReLU fused into
  BatchNormAct2d, dlkernels' Dropout), dlkernels.optim.FusedAdam(max_grad_norm=...) (clipping
  inside the optimizer step).

Both start from the same initial weights and see the batches in the same order; the dropout
masks differ (dlkernels draws them with its own generator), so the curves differ within noise.
Prints a line per epoch (loss, test accuracy, seconds), a summary, and writes a PNG of both
learning curves. ``--smoke``: one epoch of a few batches (the test suite's run).

Steps this small are short OpenMP regions: on a machine busy with other work, the OpenMP default
(idle threads spin) can make both runs several times slower than ``OMP_WAIT_POLICY=PASSIVE``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import dlkernels
from dlkernels.optim import FusedAdam

HERE = Path(__file__).resolve().parent
SMOKE_BATCHES = 3


def build_model(slope: float = 0.01, p: float = 0.1, widths: Sequence[int] = (16, 32, 64)) -> nn.Module:
    """Conv3x3 -> BN -> LeakyReLU -> Dropout blocks on 1x8x8 images; blocks 2 and 3 halve the size."""
    layers: list[nn.Module] = []
    c_in = 1
    for i, c in enumerate(widths):
        # bias=False: the batch norm's shift makes a conv bias redundant
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.LeakyReLU(slope),
                   nn.Dropout(p)]
        if i > 0:
            layers.append(nn.MaxPool2d(2))
        c_in = c
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * 2 * 2, 10))


def load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images (N, 1, 8, 8), contrast-normalized, and their labels."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    data = sk_load_digits()
    x = torch.from_numpy(data.images).float().unsqueeze(1)  # grey levels 0..16
    x = dlkernels.nn.GlobalContrastNorm(scale=1.0, lam=0.0, eps=1e-8)(x)  # per image: zero mean, unit RMS
    y = torch.from_numpy(data.target).long()
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed,
                                           stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@dataclass
class History:
    """Per-epoch results of one run."""

    name: str
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(name: str, model: nn.Module, step_opt: Callable[[nn.Module], Callable[[], None]],
          data: tuple[torch.Tensor, ...], epochs: int, batch_size: int, seed: int,
          max_batches: int | None = None) -> History:
    """Train ``model`` for ``epochs``; ``step_opt(model)`` returns the clip + optimizer step."""
    x_train, y_train, x_test, y_test = data
    step = step_opt(model)
    hist = History(name)
    # the same batch order for both runs: a generator seeded by the seed only, not by the run
    order = torch.Generator().manual_seed(seed)
    n_batches = math.ceil(len(y_train) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    model.train()
    # disable=None: the bar on a terminal only, not in logs
    with tqdm(total=epochs * n_batches, desc=f"{name:>9}", unit="batch", leave=False, disable=None) as bar:
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(len(y_train), generator=order)
            total, seen = 0.0, 0
            t0 = time.perf_counter()
            for b in range(n_batches):
                idx = perm[b * batch_size:(b + 1) * batch_size]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                loss.backward()
                step()
                total += loss.item() * len(idx)
                seen += len(idx)
                bar.update()
            hist.seconds.append(time.perf_counter() - t0)
            hist.loss.append(total / seen)
            hist.accuracy.append(accuracy(model, x_test, y_test))
            bar.write(f"{name:>9}  epoch {epoch:3d}/{epochs}  loss {hist.loss[-1]:.4f}  "
                      f"test accuracy {hist.accuracy[-1]:.2%}  {hist.seconds[-1]:.3f} s")
    return hist


def torch_step(lr: float, max_grad_norm: float) -> Callable[[nn.Module], Callable[[], None]]:
    def make(model: nn.Module) -> Callable[[], None]:
        params = list(model.parameters())
        opt = torch.optim.Adam(params, lr=lr)

        def step() -> None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return make


def dlkernels_step(lr: float, max_grad_norm: float) -> Callable[[nn.Module], Callable[[], None]]:
    def make(model: nn.Module) -> Callable[[], None]:
        opt = FusedAdam(model.parameters(), lr=lr, max_grad_norm=max_grad_norm)  # clips inside the step

        def step() -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return make


def plot(histories: list[History], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for h in histories:
        epochs = range(1, len(h.loss) + 1)
        ax_loss.plot(epochs, h.loss, marker=".", label=h.name)
        ax_acc.plot(epochs, [100 * a for a in h.accuracy], marker=".", label=h.name)
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("digits: torch vs dlkernels, same initial weights")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=HERE / "train_digits.png", help="PNG of the learning curves")
    p.add_argument("--smoke", action="store_true", help=f"1 epoch of {SMOKE_BATCHES} batches (tests)")
    args = p.parse_args(argv)
    epochs, max_batches = (1, SMOKE_BATCHES) if args.smoke else (args.epochs, None)

    data = load_digits(args.seed)
    print(f"digits: {len(data[1])} training and {len(data[3])} test images, {epochs} epochs, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, dlkernels backend {dlkernels._backend.select(torch.device('cpu'))}")
    torch.manual_seed(zlib.crc32(f"train_digits {args.seed}".encode()))
    model = build_model()
    fused = dlkernels.fuse(model)  # a fused copy with the same weights; `model` stays torch's
    runs = [("torch", model, torch_step(args.lr, args.max_grad_norm)),
            ("dlkernels", fused, dlkernels_step(args.lr, args.max_grad_norm))]
    histories = []
    for name, m, make_step in runs:
        torch.manual_seed(args.seed)  # dropout draws from here (torch's masks) or is seeded from it (dlkernels')
        histories.append(train(name, m, make_step, data, epochs, args.batch_size, args.seed, max_batches))
    plot(histories, args.out)

    n_test = len(data[3])
    last = min(5, epochs)
    print(f"\nsummary after {epochs} epoch(s) ({n_test} test images: one image is {100 / n_test:.2f} points; "
          f"the spread over the last {last} epochs shows the noise):")
    for h in histories:
        # the first epoch includes one-time costs (lazy state, allocator warm-up): left out when there are more
        secs = h.seconds[1:] or h.seconds
        which = f"epochs 2-{len(h.seconds)}" if len(h.seconds) > 1 else "one epoch"
        tail = [100 * a for a in h.accuracy[-last:]]
        spread = statistics.stdev(tail) if len(tail) > 1 else 0.0
        print(f"  {h.name:>9}: test accuracy {h.accuracy[-1]:.2%} (last {last} epochs: {statistics.mean(tail):.2f}% "
              f"+- {spread:.2f})  {statistics.mean(secs):.3f} s/epoch mean, {statistics.median(secs):.3f} median "
              f"({which})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
