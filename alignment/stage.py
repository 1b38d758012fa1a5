"""Stage 3 as a server stage: align the aggregated model to the teacher on D_align, every round or the last.

Right after each aggregation (or only the last one, `align-when`) the server fine-tunes the global
model with `alignment.loss`; the aligned weights become the next round's global model. q is read or
computed once per run (`alignment.logits`), so the teacher never runs again across rounds and reruns,
and it never exists on a client. Because the stage only wraps the aggregation output, it works with any
strategy in the registry.

In the last round, and every `align-eval-every` rounds if set, the model's metrics before alignment
(`pre-align-*`) are recorded next to the usual ones (after alignment); the last round hands the report
its alignment step drawn and counted: the confusion matrices of the global model right before and right
after that step (`alignment-step.png`, and `alignment-step` in `alignment.json`). That is one model and
one step; the paper's Figure 4 compares a run with alignment against one without (`bench/compare.py`).

The stage costs what its arithmetic costs: one model object is refilled every round (no rebuild), q is
computed once, and the pre-alignment evaluation, a full pass over the test split, runs only on the rounds
that ask for it (`bench/align_cost.py` measures the stage's share of a round).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord

from alignment.logits import (
    TeacherLogits,
    check_class_names,
    check_teacher,
    compute_teacher_logits,
    effective_beta,
    load_logits_file,
)
from alignment.loss import AlignSettings, fine_tune
from flcore.arrays import load_record, to_record
from flcore.config import Settings
from flcore.datasets import Dataset
from flcore.device import compute_of
from flcore.run_data import Prepared, prepare
from flcore.seeding import seeded_generator
from rounds.stage import Outcome, ServerContext, Stages

GROUP_KEYS = ("accuracy", "balanced-accuracy", "many-accuracy", "medium-accuracy", "few-accuracy")
ALIGN_STREAM = 1_000_003  # generator stream of the server's alignment, apart from every client partition


class AlignmentStage:
    """After-aggregation stage: record pre-alignment metrics, fine-tune on D_align, return the aligned arrays."""

    def __init__(self, ctx: ServerContext, settings: AlignSettings, q: torch.Tensor, info: dict) -> None:
        cfg = ctx.cfg
        self.ctx, self.s, self.q, self.info = ctx, settings, q, info
        self.last = cfg.num_server_rounds
        self.eval_every = cfg.align_eval_every  # 0 or a multiple of eval-every (the config checks)
        self.seed, self.image_size = cfg.seed, cfg.image_size
        self.compute = compute_of(cfg)
        self.model = ctx.new_model()  # refilled with the aggregated weights every round

    def evaluates_before(self, server_round: int) -> bool:
        """Whether this round records pre-alignment metrics: every `align-eval-every` rounds, and the last."""
        return server_round == self.last or (self.eval_every > 0 and server_round % self.eval_every == 0)

    def __call__(self, server_round: int, arrays: ArrayRecord, metrics: MetricRecord) -> Outcome:
        if self.s.when == "last-round" and server_round != self.last:
            return Outcome(arrays)
        before = None
        if self.evaluates_before(server_round):
            start = time.perf_counter()
            before = self.ctx.evaluate(arrays)
            for key in GROUP_KEYS:
                metrics[f"pre-align-{key}"] = before[key]
            metrics["pre-align-eval-seconds"] = time.perf_counter() - start
        model = load_record(self.model, arrays)
        data = self.ctx.data
        start = time.perf_counter()
        gen = seeded_generator(self.seed, server_round, ALIGN_STREAM)
        stats = fine_tune(model, data.align, data.dataset, self.image_size, self.q, self.s, gen, self.compute)
        for key, value in {**stats, "align-seconds": time.perf_counter() - start}.items():
            metrics[key] = float(value)
        aligned = to_record(model)
        if server_round != self.last:
            return Outcome(aligned)
        return self.last_step(server_round, aligned, before, self.ctx.evaluate(aligned))

    def last_step(self, server_round: int, aligned: ArrayRecord, before: dict, after: dict) -> Outcome:
        """The last alignment step: confusion matrices and group accuracies right before and right after it."""
        from alignment.figure import plot_pair

        info = {
            **self.info,
            "alignment-step": {
                "round": server_round,
                "before": {k: before[k] for k in GROUP_KEYS},
                "after": {k: after[k] for k in GROUP_KEYS},
            },
        }
        figure = plot_pair(
            np.asarray(before["confusion-matrix"]),
            np.asarray(after["confusion-matrix"]),
            before,
            after,
            self.ctx.data.dataset.classes,
            (f"round {server_round} before its alignment step", "after it"),
            f"The last alignment step of one run (teacher: {self.info['teacher']})",
        )
        return Outcome(aligned, {"alignment": info}, {"alignment-step.png": figure})


def check_inputs(cfg: Settings, dataset: Dataset, align_idx: np.ndarray) -> TeacherLogits | None:
    """Every alignment input check that needs no teacher forward, so bad input stops before round 1.

    Returns the logits when they come from `align-logits-file` (reading the file is the check).
    """
    if not cfg.align:
        return None
    if cfg.align_logits_file:
        return load_logits_file(cfg.align_logits_file, align_idx, dataset.classes, dataset.test.labels)
    effective_beta(cfg, cfg.align_teacher == "tiny")
    if cfg.holdout_teacher:
        return None  # logits only: no prompts, no feature space to match (its own check runs in `check`)
    check_teacher(cfg, "the model's projection is the teacher's feature space")
    check_class_names(dataset.classes)
    return None


def check(cfg: Settings, prepared: Prepared) -> None:
    """The preflight's alignment checks (the registry's `ServerStage.check`; the holdout teacher's reserve has
    its own entry, `holdout.check_reserve`)."""
    check_inputs(cfg, prepared.dataset, prepared.split.align)


def alignment_stages(cfg: Settings, ctx: ServerContext) -> Stages:
    """The registry factory: no stages when `align` is off; else get q once and build the stage."""
    if not cfg.align:
        return Stages()
    data = ctx.data
    align_idx = prepare(cfg).split.align
    logits = check_inputs(cfg, data.dataset, align_idx) or compute_teacher_logits(
        cfg, data.dataset, data.align, align_idx
    )
    beta, why = effective_beta(cfg, logits.random)
    info = {
        "teacher": logits.source,
        "teacher-random-weights": logits.random,
        "teacher-test-accuracy": logits.test_accuracy,
        "align-beta": cfg.align_beta,
        "beta-effective": beta,
        "beta-note": why,
        "align-loss": cfg.align_loss,
        "align-when": cfg.align_when,
    }
    acc = "n/a" if logits.test_accuracy is None else f"{logits.test_accuracy:.3f}"
    note = f" ({why})" if why else ""
    print(f"[align] teacher {logits.source}: zero-shot test accuracy {acc}; beta {beta}{note}", flush=True)
    stage = AlignmentStage(ctx, AlignSettings.from_config(cfg, beta), logits.align, info)
    return Stages(after_aggregation=[stage], sections={"alignment": info})
