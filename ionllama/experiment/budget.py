"""The time-based plan: a trainer whose schedule follows the fraction of a wall-clock budget spent, and the
compile warm-up that runs before the clock starts."""
from __future__ import annotations

import math
import time

import torch

from ._common import _autocast, _log, _sync
from .matrix import NEVER


# the wall-clock deadline's reserve: an evaluation's seconds before any curve point has been timed, and the
# margin on top (saving latest.pt, writing the arm's outputs)
RESERVE_FIRST_EVAL_S = 30.0
RESERVE_MARGIN_S = 15.0


class TimeBudgetPlan:
    """Wraps the trainer's PhasePlan: phase and learning rate at any step are those of the step
    ``total x spent / budget`` of the nominal plan, so the schedule follows training time. Training
    ends through the trainer's --max_train_time stop rule (set to the budget)."""

    def __init__(self, base, budget_s: float, clock):
        self.base, self.budget_s, self.clock = base, float(budget_s), clock
        self.total = NEVER  # the loop bound; time ends the run

    def __getattr__(self, name):  # lr, entropy_lr, warmup_steps, entropy_steps, main_steps, ...
        return getattr(self.base, name)

    def virtual_step(self) -> int:
        frac = max(0.0, self.clock()) / self.budget_s
        return min(self.base.total - 1, int(self.base.total * frac))

    def phase_of(self, step: int) -> str:
        return self.base.phase_of(self.virtual_step())

    def lr_at(self, step: int) -> float:
        return self.base.lr_at(self.virtual_step())

    def state_dict(self) -> dict:
        return {**self.base.state_dict(), "time_budget_s": self.budget_s}


def warm_up(tr) -> float:
    """One-time costs before the clock starts: CUDA/cuBLAS initialisation and torch.compile of the training
    graphs, so they do not eat into an arm's budget (compile time differs a lot between arms). Forward +
    backward on real batches in each configuration the run will use (ionLlama: entropy model frozen with a
    temporarily calibrated threshold - two batches with different patch counts, so the latent stack compiles
    for a dynamic length - and the joint configuration); no optimizer step, gradients dropped, threshold and
    freezing restored. Before this ran two batches of one padded patch count, the first main-phase step
    recompiled inside the measured time (19 s of a 75 s budget on an H200). With --step_graph, entropy and
    space patching run the frozen configuration as the two-stage step calls it (boundaries given, two
    bucketed latent lengths); the graph captures themselves (each after its warm-up steps) stay in the
    measured time, as for every arm with --step_graph."""
    m, dev = tr.model, tr.device
    t0 = time.perf_counter()
    configs = [None]
    saved = None
    if getattr(m, "needs_entropy_phase", False):
        saved = (m.entropy_threshold.detach().clone(), getattr(m, "_entropy_frozen", False))
        with torch.no_grad():
            m.calibrate_threshold(tr.sampler.get(0)[0].to(dev))
        # the joint configuration (entropy model trained) only where the plan has a joint phase
        plan = getattr(tr, "plan", None)
        configs = [True, False] if plan is None or plan.joint_steps > 0 else [True]
    from ..train.step_graph import latent_bucket, static_step_shapes

    # the baselines share ModelConfig (and its default patching): only ionLlama's own patching counts here
    dynamic_patches = not static_step_shapes(m.config, tr.sampler.get(0)[0].shape[1])
    # --step_graph: the frozen-entropy (main-phase) step calls the forward with the boundaries and a bucketed
    # latent length (train/step_graph.py), a call torch.compile traces separately: warm that one up instead
    two_stage = dynamic_patches and bool(getattr(tr.args, "step_graph", False))
    try:
        for frozen in configs:
            if frozen is not None:
                m.freeze_entropy(frozen)
            for k in range(2 if frozen is not False else 1):
                x, y = tr.sampler.get(k)
                if k == 1 and dynamic_patches:
                    # a second, different patch count, so the latent stack compiles for a dynamic length
                    # now and not at the first new count in training (two real batches often round to one)
                    x = torch.full_like(x, ord(" "))  # space patching: a patch per byte
                    if saved is not None:
                        m.entropy_threshold.fill_(float("-inf"))  # entropy patching: a patch per byte
                tr.mark_step()
                x, y = x.to(dev), y.to(dev)
                with _autocast(dev, tr.amp_dtype):
                    kw = {}
                    if two_stage and frozen is not False:  # the step's stage A (as the step calls it), then its forward
                        with torch.no_grad():
                            starts, n = tr.stage_a("main")(x)
                        kw = {"patch_starts": starts, "latent_len": latent_bucket(int(n.max()), x.shape[1])}
                    out = tr.fwd(x, y, **kw)
                    loss = out["loss"] + (out["aux_loss"] if out.get("aux_loss") is not None else 0.0)
                loss.backward()
                if saved is not None and k == 1:
                    with torch.no_grad():
                        m.calibrate_threshold(tr.sampler.get(0)[0].to(dev))
    finally:
        for p in m.parameters():
            p.grad = None
        if saved is not None:
            m.entropy_threshold.copy_(saved[0])
            m.freeze_entropy(saved[1])
    _sync(dev)
    secs = time.perf_counter() - t0
    _log(f"warm-up (initialisation{' + torch.compile' if tr.args.compile else ''}, not training time): {secs:.1f} s")
    return secs


def make_budget_trainer(train_args, explicit: set[str], budget_s: float, curve_points: int, warmup: bool = True,
                        checkpoint_every_s: float | None = None, wall_deadline: float | None = None,
                        final_evals: int = 1, first_reserve_s: float | None = None,
                        final_eval_units: float | None = None):
    """The harness Trainer with the time-based plan and evaluations every budget / curve_points seconds of
    training (at the first log point after each mark, so the logged train_time_s is exact), and latest.pt
    saved at the first evaluation after every `checkpoint_every_s` training seconds (the trainer also saves
    it when stopped or signalled). Their time is removed from the training time. `warm_up` runs first.

    wall_deadline (a time.perf_counter() value): training stops early, with latest.pt saved, once the time
    left before it would no longer fit the final evaluations: `final_eval_units` curve points' evaluations (each
    as long as the last one, with a margin; default `final_evals`, the number of final evaluations). A run killed
    at the deadline leaves no row at all; a run cut short leaves one whose training time says so (`cut_short_s`).
    first_reserve_s: the reserve until a curve point has timed an evaluation (the user's --arm_overhead_s;
    default: RESERVE_FIRST_EVAL_S per evaluation, with the margin)."""
    from ..train.trainer import Trainer

    class BudgetTrainer(Trainer):
        # an arm trained to its budget but killed before its row was written: the rerun evaluates it
        refuse_spent_time = False
        # the phases follow training time, not the nominal step counts the trainer checks a resumed step against
        # (an entropy arm interrupted in its main phase at step 21, with a nominal 6,383 entropy steps, could never
        # be continued: a new user's report)
        phases_by_step = False

        def __init__(self):
            super().__init__(train_args, explicit)
            self.recalibrate_at_stop = True  # the time budget ends an arm by a stop: its last save is scored
            self._seen, self._mark = self.train_time, None  # the clock starts with the first step
            self._tt_at_last_step = self.train_time
            self._boundary = False
            self.plan = TimeBudgetPlan(self.plan, budget_s, self._clock)
            self.eval_every = budget_s / max(1, curve_points)
            self.next_eval = (math.floor(self.train_time / self.eval_every + 1e-9) + 1) * self.eval_every
            self.next_save = self.train_time + (checkpoint_every_s or math.inf)
            self.last_eval_s = None  # wall seconds of the last curve point's evaluation
            self.cut_short_s = None  # training seconds when the wall-clock deadline stopped the run

        def reserve_s(self) -> float:
            """Wall seconds to keep for the final evaluations and saving."""
            if self.last_eval_s is None and first_reserve_s is not None:
                return first_reserve_s
            if self.last_eval_s is None:
                return 1.5 * final_evals * RESERVE_FIRST_EVAL_S + RESERVE_MARGIN_S
            # the final evaluations in curve points (their bytes over a curve point's, val@N counted): as many
            # evaluations as curve points reserved 15 s for 45 s of final evaluation
            units = final_evals if final_eval_units is None else final_eval_units
            return 1.5 * units * self.last_eval_s + RESERVE_MARGIN_S

        def run(self):
            self.warmup_s = warm_up(self) if warmup else 0.0
            return super().run()

        def _clock(self) -> float:
            """Training seconds so far: the trainer's total (exact at its log points) + time since then."""
            if self.train_time != self._seen:  # the trainer just added a window at a log point
                self._seen, self._mark = self.train_time, time.perf_counter()
            if self._mark is None:
                return self.train_time
            return self.train_time + (time.perf_counter() - self._mark)

        def _shift(self, seconds: float) -> None:
            # time the trainer itself excludes (phase set-up, its evaluations) is not on the clock either
            if getattr(self, "_mark", None) is not None:
                self._mark += seconds

        def _enter_phase(self, phase: str, resumed: bool = False) -> None:
            t0 = time.perf_counter()
            super()._enter_phase(phase, resumed)
            self._shift(time.perf_counter() - t0)
            self._boundary = False

        def evaluate(self, phase_label: str) -> dict:
            t0 = time.perf_counter()
            res = super().evaluate(phase_label)
            self._shift(time.perf_counter() - t0)
            return res

        def _phase_end(self, phase: str) -> int:
            # a phase ends when the clock says so: the trainer then closes its time window with a log point
            return self.step if getattr(self, "_boundary", False) else NEVER

        def train_step(self, step: int):
            if self._mark is None:
                self._mark = time.perf_counter()
            self._clock()
            just_logged = self.train_time != self._tt_at_last_step
            if just_logged and self.phase != "entropy" and self.train_time >= self.next_eval:
                _sync(self.device)
                t0 = time.perf_counter()
                # as the trainer's own evaluations: a joint phase drifted 4.0 -> 6.6 bytes/patch without it
                self._recalibrate_joint()
                Trainer.evaluate(self, self.phase)  # the curve point (the clock is corrected below)
                _sync(self.device)
                self.last_eval_s = time.perf_counter() - t0
                if self.train_time >= self.next_save:
                    self.save("latest.pt")
                    self.next_save = self.train_time + checkpoint_every_s
                _sync(self.device)
                # the next mark is set from the clock at this point: advancing it after the correction
                # below re-armed it at once, so evaluations ran at two or three log points in a row
                while self.next_eval <= self.train_time + 1e-9:
                    self.next_eval += self.eval_every
                # evaluation is not training time: the trainer's current window includes it, so it is
                # taken off here and the window's end restores the true clock
                off = time.perf_counter() - t0
                self.train_time -= off
                self.window_excluded_s += off  # and from the window's bytes/s (a 2.8 MB/s run logged 0.58)
                self._seen = self.train_time
            self._tt_at_last_step = self.train_time
            out = super().train_step(step)
            # after this step, does the clock put the run in the next phase? (checked as step + 1 == end)
            self._boundary = self.plan.base.phase_of(self.plan.virtual_step()) != self.phase
            if wall_deadline is not None and self.cut_short_s is None and \
                    time.perf_counter() + self.reserve_s() >= wall_deadline:
                # the trainer's own stop path ends the run at this step (saving latest.pt)
                self.cut_short_s = self._clock()
                self.request_stop("wall-clock deadline")
                _log(f"wall-clock deadline: training stops at {self.cut_short_s:.0f} s of the {budget_s:.0f} s "
                     f"budget, keeping {self.reserve_s():.0f} s for the final evaluation; this row is cut short")
            return out

    return BudgetTrainer()
