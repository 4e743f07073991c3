"""Records -> the NaN map report: verdicts on each piece of advice, per mechanism.

    python -m src.report DIR [DIR ...] [--out OUT] [--wandb {off,offline,online}]

Reads every `record.json` below the given directories (nanlab.record) and nothing else: no
torch, transformers or hydra import anywhere in this package, so a cluster's results render
on a laptop in seconds. The modules, in the order the data flows:

    collect   records -> results table (one row per run; duplicates resolved)
    cells     runs -> cells (seeds pooled by the record's `cell`), outcome per cell, the
              test-time outcome beside it (TEST_FAILS: finite in training, not at test)
    match     Hydra overrides against a resolved config
    verdicts  mechanisms -> baseline, mitigation cells, measured effect, agreement (RULES);
              `judged_on: test` mechanisms on the test-time outcome (measure_test)
    summary   per-advice lines, the bf16-range claim, the verdicts table
    advice    ADVICE: the advice ids as data
    frontier  the stable-lr frontier of the core map
    sensitivity  LR sensitivity per precision x mitigation (Wortsman et al. 2023): LR
              families, E_lr[min(l(lr), l0) - l*], the ranking within each precision
    figures   matrix.png, frontier.png, lr_sensitivity.png;  nanmap: the appendix's nan_map.png
    markdown  report.md;  write: the pipeline, console summary, W&B
"""

from .advice import ADVICE, MITIGATION_ADVICE, Advice, advice_for, range_facts
from .cells import (
    MIN_SEEDS,
    OUTCOME_TEXT,
    OUTCOMES,
    TEST_FAILS,
    Cell,
    build_cells,
    cells_frame,
    two_thirds,
)
from .collect import collect, load_results, normalize_results, run_config, write_results
from .figures import draw_frontier, draw_matrix, draw_sensitivity
from .frontier import FRONTIER_RULE, fmt_lr, frontier_frame, lines
from .match import equal_except, matches, parse_override
from .nanmap import draw_map
from .sensitivity import (
    MIN_LRS,
    SENSITIVITY_RULE,
    Family,
    families,
    ranking_lines,
    sensitivity_frame,
)
from .summary import advice_lines, pairs_frame, range_pairs
from .verdicts import RULES, Mechanism, Pair, agreement, measure, measure_test, mechanisms
from .write import Analysis, analyze, write_report

__all__ = [
    "ADVICE",
    "FRONTIER_RULE",
    "MIN_LRS",
    "MIN_SEEDS",
    "MITIGATION_ADVICE",
    "OUTCOMES",
    "OUTCOME_TEXT",
    "RULES",
    "SENSITIVITY_RULE",
    "TEST_FAILS",
    "Advice",
    "Analysis",
    "Cell",
    "Family",
    "Mechanism",
    "Pair",
    "advice_for",
    "advice_lines",
    "agreement",
    "analyze",
    "build_cells",
    "cells_frame",
    "collect",
    "draw_frontier",
    "draw_map",
    "draw_matrix",
    "draw_sensitivity",
    "equal_except",
    "families",
    "fmt_lr",
    "frontier_frame",
    "lines",
    "load_results",
    "matches",
    "measure",
    "measure_test",
    "mechanisms",
    "normalize_results",
    "pairs_frame",
    "parse_override",
    "range_facts",
    "range_pairs",
    "ranking_lines",
    "run_config",
    "sensitivity_frame",
    "two_thirds",
    "write_report",
    "write_results",
]
