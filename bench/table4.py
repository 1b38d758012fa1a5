"""The paper's Table 4: few-shot training from the DWP-pretrained g_fl vs from scratch.

Run: `python -m bench.table4 [--fractions 0.4 1 2] [--epochs 30] [--target 0.5] [--run-config "k=v ..."]`.
For each fraction of the training set (stratified, at least one image per class) it trains the FL model
centrally for `--epochs` epochs twice, once from random init and once from the pretrained g_fl (the
backbone, and the projection when `projection-dim` equals LLaVA's vision width; classifier fresh),
evaluates on the test split after every epoch, and writes
`table4.md`, `table4.csv` and `table4.png` (accuracy curves) to `--out`: epochs to reach `--target`
accuracy and best accuracy per run. The pretrained weights come from `pretrain.stage` with the same
run-config keys as an FL run (and its cache: an FL run with the same settings reuses it). The offline
default is digits with the tiny random teacher, which the outputs say; with a real teacher and CIFAR the
same command reproduces the paper's setting.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

from flcore import datasets
from flcore.batches import Batches
from flcore.config import Settings, validate
from flcore.metrics import summarize
from flcore.run_config import parse_overrides
from flcore.seeding import seeded_generator
from flcore.training import TrainSettings, predict, train
from pretrain.stage import pretrained_weights
from pretrain.teacher import TINY, TINY_NOTE
from strategies.registry import STRATEGIES

matplotlib.use("Agg")  # files only, never a window; pyplot takes its backend at the first figure, not at import
from flcore.models import run_model


def few_shot(labels: np.ndarray, percent: float, seed: int) -> np.ndarray:
    """A stratified `percent` % of the indices, at least one per class."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.extend(rng.choice(idx, max(1, round(len(idx) * percent / 100)), replace=False))
    return np.sort(np.asarray(picked))


def curve(cfg: Settings, dataset, subset, pretrained: dict | None, epochs: int) -> list[float]:
    """Test accuracy after each epoch of central training on `subset`, from random init or `pretrained`
    (FL model entries: `backbone.*`, maybe `projection.*`)."""
    model = run_model(cfg, dataset.num_classes, seed=cfg.seed)
    if pretrained is not None:
        model.load_state_dict({**model.state_dict(), **pretrained})
    size = cfg.image_size
    batches = Batches(subset, dataset, size, cfg.batch_size)
    test = Batches(dataset.test, dataset, size, cfg.eval_batch_size)
    settings = TrainSettings(1, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.augment)
    gen = seeded_generator(cfg.seed, len(subset))
    accs = []
    for _ in range(epochs):
        train(model, batches, settings, gen)
        preds, labels = predict(model, test)
        accs.append(summarize(preds, labels, dataset.num_classes, {})["accuracy"])
    return accs


def epochs_to(accs: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accs) if a >= target), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.table4", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.4, 1.0, 2.0], help="percent of train set")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--target", type=float, default=0.5, help="accuracy whose first epoch is reported")
    parser.add_argument("--run-config", default="", help='run-config overrides, e.g. "pretrain-epochs=2"')
    parser.add_argument("--out", type=Path, default=Path("outputs/table4"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = validate({**parse_overrides([args.run_config]), "pretrain": True}, choices={"strategy": STRATEGIES})
    dataset = datasets.load(cfg.dataset, cfg.data_dir, cfg.image_size)
    pretrained, meta = pretrained_weights(cfg, dataset.mean, dataset.std)
    note = TINY_NOTE if cfg.pretrain_teacher == TINY else f"teacher {cfg.pretrain_teacher}"
    rows, curves = [], {}
    for pct in args.fractions:
        subset = dataset.train.subset(few_shot(dataset.train.labels, pct, cfg.seed))
        for init, weights in (("scratch", None), ("pretrained", pretrained)):
            accs = curve(cfg, dataset, subset, weights, args.epochs)
            curves[(pct, init)] = accs
            rows.append(
                {
                    "fraction %": pct,
                    "images": len(subset),
                    "init": init,
                    f"epochs to {args.target:.2f}": epochs_to(accs, args.target) or "-",
                    "best accuracy": round(max(accs), 4),
                    "final accuracy": round(accs[-1], 4),
                }
            )
            print(rows[-1], flush=True)
    write(args.out, rows, curves, cfg, note, meta, args)


def write(out: Path, rows: list[dict], curves: dict, cfg: Settings, note: str, meta: dict, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "table4.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    head = list(rows[0])
    lines = [
        f"# Table 4: few-shot training, pretrained vs from scratch ({cfg.dataset}, {cfg.model})",
        "",
        f"Pretraining: {note}; DWP {cfg.pretrain_epochs} epochs on {meta.get('records', '?')} records "
        f"(final LM loss {meta['epoch-loss'][-1]:.4f}); handed over: {' + '.join(meta['handed-over'])}. "
        f"{args.epochs} epochs of central SGD (lr {cfg.lr}, "
        f"batch {cfg.batch_size}) per run, test accuracy after every epoch.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    (out / "table4.md").write_text("\n".join(lines) + "\n")
    fractions = sorted({p for p, _ in curves})
    fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3.2), squeeze=False)
    for ax, pct in zip(axes[0], fractions, strict=True):
        for init in ("scratch", "pretrained"):
            accs = curves[(pct, init)]
            ax.plot(range(1, len(accs) + 1), accs, label=init)
        ax.axhline(args.target, color="grey", lw=0.8, ls="--")
        ax.set(title=f"{pct} % of train", xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
        ax.legend()
    fig.suptitle(note, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "table4.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'table4.md'}, table4.csv, table4.png")


if __name__ == "__main__":
    main()
