"""Mechanisms -> baseline, mitigation cells, measured effect, agreement with the prediction.

The predictions come from the records alone: every record of a stressed run carries its
mechanism's YAML under config["stress"] (cause, baseline, predictions). RULES below is the
rule set (issues 9 and 10), written into report.md as it is applied here.

A mechanism whose YAML says `judged_on: test` (serving_masked_rows) fails in the run's test pass,
not in training: its baseline and its mitigations are judged on the test-time outcome
(measure_test), every other rule is the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .cells import Cell, two_thirds
from .match import equal_except, get, matches_all, touched_keys, updated

EFFECTS = ("fixes", "delays", "no_effect", "worsens")
MEASURED = (*EFFECTS, "stalls", "mixed")
DELAY_FACTOR = 1.5
SPREAD_MARGIN = 0.1
MORE_SAMPLES = 1  # judged at test time: worsens = median non-finite samples + this
COUNTS = "counts"
TEST = "test"  # judged_on: test

RULES = f"""\
- **Cells.** Runs are pooled into a cell by the record's `cell` (the hash of the resolved
  config without the seed): seeds are only ever pooled with seeds. Interrupted and error runs
  are no evidence. A cell's outcome: its finished seeds, ok (finite *and* trained), stalled
  (finite, not trained), non-finite and diverged counted separately; the causes seen; the
  median first bad step and median `nonfinite_param_frac` of its failing seeds. Beside it the
  test-time outcome: a run that stayed finite serves its test split (batched, `serve.*`) and
  its seeds count as test finite, test non-finite or not run, with the failing sample ids and
  the cause. A cell with at least 2/3 of its seeds finite in training (ok or stalled) and a
  non-finite test pass on at least 2/3 of the seeds that ran it is **finite in training,
  non-finite at test time**.
- **Pairs.** For mechanism M: the baseline cell matches every baseline override. For a
  prediction, the mitigation cell matches the baseline overrides updated by the prediction's
  (same key replaced, new key added) *and* equals the baseline cell's config everywhere but
  under the keys the prediction touches (a group override such as `softmax=sdpa` touches the
  whole group): cells that differ in that one setting only.
- **Seeds.** At least 3 seeds a cell for a verdict; fewer: "too few seeds (n)".
- **Baseline.** A baseline counts only if at least 2/3 of its seeds failed (non-finite or
  diverged) with the declared cause; otherwise its mechanism's rows say "baseline did not fail
  with <cause> (k/n seeds)" and count nowhere.
- **Control.** A mechanism whose YAML declares a `control:` (the baseline with its trigger
  removed: for most, `stress=none`) counts only if the control ran with at least 3 seeds and
  none of them failed with the declared cause (judged at test time: none failed its test pass
  with it); otherwise its rows say "control failed with <cause> too (k/n seeds)" (the failure
  does not need the mechanism) or "control not run", and count nowhere.
- **Acted in time.** A prediction with `acts_at` (e.g. `precision.switch_step`) counts only if
  the mitigation cell's value of that key is below the baseline's median first bad step;
  otherwise "excluded: acted at step s, after the baseline failed at step f".
- **Measured effect** (one rule for every advice): **fixes** = at least 2/3 of the
  mitigation's seeds ok; **delays** = it still fails (>= 2/3 of seeds) but its median first
  bad step is at least {DELAY_FACTOR:g}x the baseline's (factor k given); **worsens** = it fails
  with a median first bad step below the baseline's, or with a median `nonfinite_param_frac`
  larger than the baseline's by more than {SPREAD_MARGIN:g}; **no_effect** = it fails otherwise;
  **stalls** = at least 2/3 of its seeds stalled: finite but not trained (not a fix;
  agreement counts it as no_effect); **mixed** = none of these (counts given).
- **Judged at test time** (`judged_on: test` in the mechanism's YAML): the failure is the run's
  test pass, not training. The baseline counts only if at least 2/3 of its seeds trained
  finite *and* their test pass was non-finite with the declared cause. Measured effect:
  **fixes** = at least 2/3 of the mitigation's seeds trained finite and served their test
  split finite (ok or stalled alike: the training outcome is not the question here);
  **worsens** = training itself fails (at least 2/3 of seeds), or more test samples fail
  (median non-finite test samples above the baseline's by at least {MORE_SAMPLES}); **no_effect**
  = the test pass is non-finite otherwise (at least 2/3 of seeds); **mixed** = none of these;
  delays and stalls do not apply. The test pass comes after the last training step, so
  `acts_at` compares with the baseline's `max_steps`.
- **Positive control.** A mechanism counts only if at least one prediction with effect
  `fixes` is measured as fixes; otherwise its rows are shown, marked "positive control
  failed", and count nowhere.
- **Agreement.** Measured == predicted (stalls as no_effect): agrees. **refutes** is used
  only for predicted fixes, measured no_effect, worsens or stalls. Every other mismatch is
  "disagrees", with both values. An advice predicted to have no effect (outside its scope)
  can never be refuted.
"""


@dataclass
class Measured:
    effect: str  # one of MEASURED
    detail: str
    factor: float | None = None  # delays / sooner: mitigation step / baseline step


def _step(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def measure(base: Cell, mit: Cell) -> Measured:
    """The mitigation cell's effect relative to the baseline cell (the rule in RULES)."""
    n = mit.n_seeds
    if two_thirds(mit.n_ok, n):
        return Measured("fixes", f"{mit.n_ok}/{n} seeds ok")
    if two_thirds(mit.n_failed, n):
        f, g = base.median_bad_step, mit.median_bad_step
        factor = g / f if (f is not None and g is not None and f > 0) else None
        steps = f"first bad step {_step(f)} -> {_step(g)}"
        if f is not None and g is not None and g < f:
            return Measured("worsens", f"fails sooner: {steps}", factor)
        p, q = base.median_param_frac, mit.median_param_frac
        if p is not None and q is not None and q - p > SPREAD_MARGIN:
            return Measured(
                "worsens",
                f"poisons more of the weights: non-finite parameter "
                f"fraction {p:.2f} -> {q:.2f}; {steps}",
                factor,
            )
        if f is not None and g is not None and g > f and g >= DELAY_FACTOR * f:
            k = "from step 0" if factor is None else f"{factor:.1f}x"
            return Measured("delays", f"fails later: {steps} ({k})", factor)
        return Measured("no_effect", f"fails like the baseline: {steps}", factor)
    if two_thirds(mit.n_stalled, n):
        return Measured("stalls", f"finite but not trained: {mit.counts()}")
    return Measured("mixed", f"mixed seeds: {mit.counts()}")


def _samples(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def measure_test(base: Cell, mit: Cell) -> Measured:
    """Judged at test time (RULES): the mitigation's test-time outcome vs the baseline's."""
    n = mit.n_seeds
    if two_thirds(mit.n_test_finite, n):
        return Measured(
            "fixes",
            f"{mit.n_test_finite}/{n} seeds trained finite and served "
            f"finite; training {mit.counts()}",
        )
    if two_thirds(mit.n_failed, n):
        return Measured("worsens", f"training itself fails: {mit.counts()}")
    if two_thirds(mit.n_test_nonfinite, n):
        p, q = base.median_test_nonfinite, mit.median_test_nonfinite
        samples = (
            f"non-finite test samples {_samples(p)}/{base.test_samples} -> "
            f"{_samples(q)}/{mit.test_samples}"
        )
        if p is not None and q is not None and q - p >= MORE_SAMPLES:
            return Measured("worsens", f"more test samples fail: {samples}")
        return Measured(
            "no_effect",
            f"non-finite at test time like the baseline: {mit.test_counts()}, {samples}",
        )
    return Measured("mixed", f"mixed seeds: {mit.counts()}; {mit.test_counts()}")


def agreement(predicted: str, measured: str) -> str:
    """agrees / refutes / disagrees (see RULES)."""
    as_effect = "no_effect" if measured == "stalls" else measured
    if as_effect == predicted:
        return "agrees"
    if predicted == "fixes" and as_effect in ("no_effect", "worsens"):
        return "refutes"
    return "disagrees"


@dataclass
class Pair:
    mechanism: str
    advice: str
    mitigation: list[str]
    predicted: str
    why: str = ""
    acts_at: str | None = None
    cell: Cell | None = None
    measured: str | None = None
    detail: str = ""
    factor: float | None = None
    agreement: str | None = None
    status: str = COUNTS  # COUNTS or why this pair does not count
    n_matches: int = 0  # cells that matched (more than 1: the first is used)
    at_test: bool = False  # judged at test time (its mechanism's judged_on: test)

    @property
    def counts(self) -> bool:
        return self.status == COUNTS

    @property
    def arm(self) -> str:
        return " ".join(self.mitigation)


@dataclass
class Mechanism:
    name: str
    cause: str
    baseline: list[str]
    text: str = ""  # the YAML's `mechanism`
    reference: str = ""
    base: Cell | None = None
    base_status: str = COUNTS  # COUNTS or why the baseline does not count
    control: bool = False  # the positive control is green
    pairs: list[Pair] = field(default_factory=list)
    others: list[Cell] = field(default_factory=list)  # cells of M no prediction matched
    context: str = ""  # settings of this baseline when M has several
    judged_on: str = "training"  # or TEST: the run's test pass shows the failure
    control_overrides: list[str] | None = None  # the YAML's `control:` (None: not declared)
    control_cell: Cell | None = None  # the baseline with the trigger removed, as run

    @property
    def at_test(self) -> bool:
        return self.judged_on == TEST

    @property
    def label(self) -> str:
        return self.name + (f" [{self.context}]" if self.context else "")

    @property
    def fail_step(self) -> float | None:
        """When the baseline failed: its median first bad step; judged at test time, the end
        of training (the test pass follows the last step)."""
        b = self.base
        if b is None:
            return None
        if self.at_test:
            steps = get(b.config, "max_steps")
            return None if steps is None else float(steps)
        return b.median_bad_step

    @property
    def counts(self) -> bool:
        return self.base_status == COUNTS and self.control

    @property
    def status(self) -> str:
        if self.base_status != COUNTS:
            return self.base_status
        return COUNTS if self.control else "positive control failed"


def _spec(cells: list[Cell]) -> dict:
    for c in cells:
        s = (c.config or {}).get("stress")
        if isinstance(s, dict) and ("baseline" in s or "predictions" in s):
            return s
    return {}


def _predictions(spec: dict) -> list[dict]:
    out = []
    for p in spec.get("predictions") or []:
        if isinstance(p, str):
            p = json.loads(p)
        out.append(dict(p))
    return out


def mechanisms(cells: list[Cell]) -> list[Mechanism]:
    """One Mechanism per (stress, baseline cell); stress=none cells are the core map."""
    by_name: dict[str, list[Cell]] = {}
    for c in cells:
        if c.stress and c.stress != "none":
            by_name.setdefault(c.stress, []).append(c)
    out = []
    for name in sorted(by_name):
        group = by_name[name]
        spec = _spec(group)
        baseline = [str(o) for o in spec.get("baseline") or []]
        bases = baseline_cells(group, baseline, _predictions(spec)) if spec else []
        # None: no baseline ran (the mechanism's rows say so)
        for base in bases or [None]:  # type: ignore[list-item]
            cause = spec.get("cause") or ""
            # a mechanism may fail one of several ways: [exp_overflow, exp_underflow]
            cause = " or ".join(cause) if isinstance(cause, list) else str(cause)
            control = spec.get("control")
            m = Mechanism(
                name=name,
                cause=cause,
                baseline=baseline,
                control_overrides=[str(o) for o in control] if control else None,
                text=str(spec.get("mechanism") or ""),
                reference=str(spec.get("reference") or ""),
                base=base,
                judged_on=TEST if str(spec.get("judged_on") or "") == TEST else "training",
            )
            if base is not None and len(bases) > 1:
                m.context = base.describe(
                    bases[0].config if base is not bases[0] else bases[1].config
                )
            m.control_cell = find_control(m, cells)
            judge_mechanism(m, group, _predictions(spec))
            out.append(m)
    return out


def _is_mitigation_of(x: Cell, b: Cell, baseline: list[str], p: dict) -> bool:
    overrides = [str(o) for o in p.get("mitigation") or []]
    return (
        not matches_all(b.config, overrides)
        and matches_all(x.config, updated(baseline, overrides))
        and equal_except(b.config, x.config, touched_keys(overrides))
    )


def baseline_cells(group: list[Cell], baseline: list[str], preds: list[dict]) -> list[Cell]:
    """Cells matching every baseline override that are not a prediction's mitigation of
    another such cell (clip=0.1 matches a baseline that does not name clip). With a cycle,
    the cell with the most mitigation cells around it."""
    cands = [c for c in group if matches_all(c.config, baseline)]
    mits = {
        x.key
        for x in cands
        for b in cands
        if x is not b and any(_is_mitigation_of(x, b, baseline, p) for p in preds)
    }
    bases = [c for c in cands if c.key not in mits]
    if not bases and cands:

        def around(b: Cell) -> int:
            return sum(
                any(_is_mitigation_of(x, b, baseline, p) for x in group if x is not b)
                for p in preds
            )

        bases = [max(cands, key=lambda b: (around(b), b.n_seeds, b.key))]
    return sorted(bases, key=lambda c: (-c.n_seeds, c.key))


def find_control(m: Mechanism, cells: list[Cell]) -> Cell | None:
    """The cell that is the baseline updated by the control's overrides and equal to it
    everywhere else (a control with stress=none is a cell of the core map's kind)."""
    if m.base is None or not m.control_overrides:
        return None
    want = updated(m.baseline, m.control_overrides)
    touched = touched_keys(m.control_overrides)
    found = sorted(
        (
            c
            for c in cells
            if c is not m.base
            and matches_all(c.config, want)
            and equal_except(m.base.config, c.config, touched)
        ),
        key=lambda c: (-c.n_seeds, c.key),
    )
    return found[0] if found else None


def control_status(m: Mechanism) -> str:
    """COUNTS when the control ran (3 seeds) and no seed failed with the declared cause: the
    failure needs the mechanism's trigger. A mechanism whose records declare no control
    (older records) is judged without this rule."""
    if m.control_overrides is None:
        return COUNTS
    c, what = m.control_cell, " ".join(m.control_overrides)
    if c is None:
        return f"control not run ({what})"
    if not c.enough_seeds:
        return f"too few seeds ({c.n_seeds}) in the control ({what})"
    k = c.n_test_failed_with(m.cause) if m.at_test else c.n_failed_with(m.cause)
    if k:
        return (
            f"control failed with {m.cause or 'its cause'} too ({k}/{c.n_seeds} seeds "
            f"with {what}): the failure does not need the mechanism's trigger"
        )
    return COUNTS


def base_status(m: Mechanism) -> str:
    b = m.base
    if b is None:
        return (
            "no prediction data in the records"
            if not m.baseline
            else "baseline not run (no cell matches " + " ".join(m.baseline) + ")"
        )
    if not b.enough_seeds:
        return f"too few seeds ({b.n_seeds}) in the baseline"
    if m.at_test:
        k = b.n_test_failed_with(m.cause)
        if not two_thirds(k, b.n_seeds):
            return (
                f"baseline did not fail at test time with {m.cause or 'its cause'} "
                f"({k}/{b.n_seeds} seeds trained finite and failed the test pass)"
            )
        return control_status(m)
    k = b.n_failed_with(m.cause)
    if not two_thirds(k, b.n_seeds):
        return f"baseline did not fail with {m.cause or 'its cause'} ({k}/{b.n_seeds} seeds)"
    return control_status(m)


def find_mitigation(m: Mechanism, group: list[Cell], overrides: list[str]) -> list[Cell]:
    if m.base is None:
        return []
    want = updated(m.baseline, overrides)
    touched = touched_keys(overrides)
    return sorted(
        (
            c
            for c in group
            if c is not m.base
            and matches_all(c.config, want)
            and equal_except(m.base.config, c.config, touched)
        ),
        key=lambda c: (-c.n_seeds, c.key),
    )


def judge_pair(m: Mechanism, p: Pair) -> None:
    base, mit = m.base, p.cell
    if mit is None:
        p.status = "not run"
        return
    if m.base_status != COUNTS:
        p.status = m.base_status
        return
    f = m.fail_step
    if p.acts_at:
        s = get(mit.config, p.acts_at)
        if s is None:
            p.status = f"excluded: {p.acts_at} not in the mitigation's config"
            return
        if f is None or not float(s) < f:
            when = f"at test time, after step {_step(f)}" if m.at_test else f"at step {_step(f)}"
            p.status = (
                f"excluded: acted at step {_step(float(s))}, after the baseline failed {when}"
            )
            return
    if not mit.enough_seeds:
        p.status = f"too few seeds ({mit.n_seeds})"
        return
    if base is None:  # a counted baseline ran; kept for the type checker
        p.status = "no baseline"
        return
    r = measure_test(base, mit) if m.at_test else measure(base, mit)
    p.measured, p.detail, p.factor = r.effect, r.detail, r.factor
    p.agreement = agreement(p.predicted, r.effect)


def judge_mechanism(m: Mechanism, group: list[Cell], predictions: list[dict]) -> None:
    m.base_status = base_status(m)
    used = {m.base.key} if m.base else set()
    for spec in predictions:
        overrides = [str(o) for o in spec.get("mitigation") or []]
        p = Pair(
            mechanism=m.label,
            advice=str(spec.get("advice") or "?"),
            mitigation=overrides,
            predicted=str(spec.get("effect") or "?"),
            why=str(spec.get("why") or ""),
            acts_at=spec.get("acts_at"),
            at_test=m.at_test,
        )
        found = find_mitigation(m, group, overrides)
        p.n_matches = len(found)
        p.cell = found[0] if found else None
        used.update(c.key for c in found)
        judge_pair(m, p)
        m.pairs.append(p)
    m.control = any(p.counts and p.predicted == "fixes" and p.measured == "fixes" for p in m.pairs)
    if not m.control and m.base_status == COUNTS:
        has_fix = any(p.predicted == "fixes" for p in m.pairs)
        for p in m.pairs:
            if p.counts:
                p.status = (
                    "positive control failed"
                    if has_fix
                    else "positive control failed (no prediction says fixes)"
                )
    m.others = [c for c in group if c.key not in used]
