"""The paper's data recipe: D_align, a long-tailed pool (Cui et al.), a split over clients.

With the offline stand-in teacher (`align-teacher=holdout`) a class-balanced reserve for its training is
carved right after D_align, before the long-tailed cut: a teacher standing in for CLIP must know every
class about equally, and the images the cut leaves over are a reversed long tail (none of the head class).
The pool's head gives those images up; `Split.pool_cut` says how many per class.

Everything is a pure function of the labels and the seed, so the server and every client derive the
same split independently and no index lists travel over the network. Clients are split by a
flwr-datasets `Partitioner` chosen by name (`flcore.partitioners.PARTITIONERS`): CReFF's re-balanced
Dirichlet split (the paper's protocol, `flcore.creff_split.creff_split`) or flwr-datasets' own `DirichletPartitioner`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flcore.config import ConfigError

AUTO = "auto"  # holdout-per-class: a tenth of the smallest class of the training split
AUTO_SHARE = 10


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class sizes of the exponential profile: class c keeps int(n_max * IF^(-c/(C-1)))."""
    if num_classes == 1:
        return [n_max]
    return [int(n_max * imbalance_factor ** (-c / (num_classes - 1))) for c in range(num_classes)]


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` random indices of every class (all of a class's indices when it has fewer)."""
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def long_tail_pool(
    labels: np.ndarray, available: np.ndarray, num_classes: int, imbalance_factor: float, rng: np.random.Generator
) -> np.ndarray:
    """Indices of the long-tailed pool drawn from `available`.

    n_max is the balanced per-class size of the whole training split (len(labels) / C), as in Cui et al.
    and CReFF; a class with fewer available images keeps all of them. IF = 1 keeps every available
    image, so an already long-tailed source (ImageNet-LT) passes through unchanged.
    """
    if imbalance_factor == 1:
        return np.sort(available)
    wanted = long_tail_counts(len(labels) // num_classes, num_classes, imbalance_factor)
    avail_labels = labels[available]
    picked = [rng.permutation(available[avail_labels == c])[:n] for c, n in enumerate(wanted)]
    return np.sort(np.concatenate(picked))


def pool_sizes(available: np.ndarray, n_max: int, imbalance_factor: float) -> np.ndarray:
    """Per-class sizes `long_tail_pool` gives from `available` images per class (all of them at IF = 1)."""
    if imbalance_factor == 1:
        return available
    return np.minimum(long_tail_counts(n_max, len(available), imbalance_factor), available)


def holdout_per_class(setting: int | str, labels: np.ndarray, num_classes: int) -> int:
    """The reserve's images per class: `setting`, or with `auto` a tenth of the training split's smallest
    class (at least one), so that even the tail's class gives up little of what the long-tailed cut may keep."""
    if setting != AUTO:
        return int(setting)
    return max(1, int(np.bincount(labels, minlength=num_classes).min()) // AUTO_SHARE)


def holdout_reserve(
    labels: np.ndarray, available: np.ndarray, setting: int | str, num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """The stand-in teacher's training images: the same number of every class, drawn from `available`.

    Refused when a class could not give that many and keep one for the clients: a teacher missing a class
    would hand the alignment a q that is wrong for it, and a class no client holds is a different experiment.
    """
    per_class = holdout_per_class(setting, labels, num_classes)
    counts = np.bincount(labels[available], minlength=num_classes)
    short = int(np.argmin(counts))
    if counts[short] <= per_class:
        shown = f"'{AUTO}' (= {per_class})" if setting == AUTO else str(per_class)
        allowed = f"an integer from 1 to {counts[short] - 1}" if counts[short] > 1 else "a smaller align-per-class"
        raise ConfigError(
            f"run-config key 'holdout-per-class' = {shown} is not allowed for this dataset: the stand-in teacher "
            f"(align-teacher = 'holdout') trains on that many training images of every class, reserved before the "
            f"long-tailed cut, and class {short} has {counts[short]} left after D_align, so the reserve would leave "
            f"the clients none of it; expected {allowed}, or another teacher or align-logits-file."
        )
    return available[balanced_subset(labels[available], per_class, rng)]


def pool_cut(left: np.ndarray, held: np.ndarray, n_max: int, imbalance_factor: float) -> np.ndarray:
    """Images per class the pool gives up to the reserve: its sizes from `left + held` images per class minus
    those from `left` (the head's, and more classes' when IF is small)."""
    return pool_sizes(left + held, n_max, imbalance_factor) - pool_sizes(left, n_max, imbalance_factor)


def client_split(
    labels: np.ndarray, partitioner: str, num_clients: int, alpha: float, seed: int, min_size: int, num_classes: int
) -> list[np.ndarray]:
    """Sorted positions into `labels` for each client, from the named partitioner.

    `min_size` is the smallest partition allowed: DirichletPartitioner redraws below it (and gives up after
    10 draws); CReFF's sizes are fixed at len(labels) / num_clients, so a pool too small for it is refused.
    """
    import datasets

    from flcore.creff_split import partition_positions
    from flcore.partitioners import PARTITIONERS

    table = datasets.Dataset.from_dict({"label": labels.tolist(), "pos": list(range(len(labels)))})
    chosen = PARTITIONERS[partitioner](num_clients, alpha, seed, min_size, num_classes)
    chosen.dataset = table
    try:
        parts = [np.sort(p) for p in partition_positions(chosen)]
    except ValueError as err:
        raise ConfigError(f"partitioner '{partitioner}' cannot split {len(labels)} images: {err}") from err
    smallest = min(len(p) for p in parts)
    if smallest < min_size:
        raise ConfigError(
            f"run-config key 'min-partition-size' = {min_size} is not allowed: partitioner '{partitioner}' gives "
            f"the smallest of {num_clients} clients {smallest} of {len(labels)} pool images; lower it or num-clients."
        )
    return parts


@dataclass(frozen=True)
class Split:
    """D_align's indices into its source (the training split, unless align-data says otherwise), the
    long-tailed pool's and each client's indices into the training split."""

    align: np.ndarray
    pool: np.ndarray
    clients: list[np.ndarray]
    num_classes: int
    align_from_train: bool = True
    holdout: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # the stand-in's reserve
    pool_cut: np.ndarray | None = None  # images per class the pool gave up to that reserve (None: no pool)

    def pool_counts(self, labels: np.ndarray) -> np.ndarray:
        return np.bincount(labels[self.pool], minlength=self.num_classes)

    def reserve(self, labels: np.ndarray) -> dict[str, list[int]]:
        """The holdout teacher's reserve as the reports show it: its training images per class and, where
        there is a pool, the images per class the pool gave up for it (empty without a reserve)."""
        if not len(self.holdout):
            return {}
        counts = {"train-counts": np.bincount(labels[self.holdout], minlength=self.num_classes).tolist()}
        return counts if self.pool_cut is None else {**counts, "pool-cut": self.pool_cut.tolist()}

    def client_histogram(self, labels: np.ndarray) -> np.ndarray:
        """clients x classes image counts (no rows when the clients hold their own data)."""
        rows = [np.bincount(labels[idx], minlength=self.num_classes) for idx in self.clients]
        return np.stack(rows) if rows else np.zeros((0, self.num_classes), dtype=np.int64)


def make_split(
    labels: np.ndarray,
    num_classes: int,
    imbalance_factor: float,
    align_per_class: int,
    num_clients: int,
    alpha: float,
    min_size: int,
    seed: int,
    *,
    partitioner: str = "creff",
    align_labels: np.ndarray | None = None,
    holdout: int | str = 0,
) -> Split:
    """D_align first (class-balanced), then the stand-in teacher's class-balanced reserve when `holdout` is
    set (images per class, or `auto`; 0 = none), then the long-tailed pool from what is left, then the
    client split. Without a reserve the random draws are exactly those of a recipe that never had one.

    With `align_labels` (a separate D_align source: ImageNet-LT's val split, a server folder) D_align is
    drawn from those and the whole training split stays available to the pool.
    """
    rng = np.random.default_rng(seed)
    own = align_labels is None
    align = balanced_subset(labels if own else align_labels, align_per_class, rng)
    rest = np.setdiff1d(np.arange(len(labels)), align) if own else np.arange(len(labels))
    held = np.zeros(0, dtype=np.int64)
    if holdout:
        held = holdout_reserve(labels, rest, holdout, num_classes, rng)
        rest = np.setdiff1d(rest, held)
    pool = long_tail_pool(labels, rest, num_classes, imbalance_factor, rng)
    if len(pool) < num_clients * max(1, min_size):  # say so before drawing: a huge num-clients would take minutes
        raise ConfigError(
            f"run-config key 'num-clients' = {num_clients} is not allowed: the long-tailed pool holds {len(pool)} "
            f"images, fewer than num-clients x min-partition-size ({max(1, min_size)})."
        )
    parts = client_split(labels[pool], partitioner, num_clients, alpha, seed, min_size, num_classes)
    sizes = [np.bincount(labels[idx], minlength=num_classes) for idx in (rest, held)]
    cut = pool_cut(*sizes, len(labels) // num_classes, imbalance_factor)
    return Split(align, pool, [pool[p] for p in parts], num_classes, own, held, cut)


def class_groups(counts: np.ndarray, many: int, few: int) -> dict[str, list[int]]:
    """ImageNet-LT convention: many (> many), medium (few..many), few (< few) training images."""
    return {
        "many": [c for c, n in enumerate(counts) if n > many],
        "medium": [c for c, n in enumerate(counts) if few <= n <= many],
        "few": [c for c, n in enumerate(counts) if n < few],
    }
