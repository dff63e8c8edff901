"""Acceptance report for a bundle on a labelled test set: what a quality engineer signs off on.

Not to be confused with :mod:`o2n_edge.eval_tables`, which formats the offline evaluation's result
tables (AUROC / AP / F1-max over shots and seeds). This package answers the line's questions for
one shipped bundle: at the threshold it ships with, how many good parts are rejected and how many
defects pass, per defect type, and what the misses look like.

It runs on the torch-free runtime (the bundle is all a line engineer has) plus the ``report``
extra (matplotlib for the plots, scikit-learn and scipy for the curves, intervals and PRO).

Modules: :mod:`.operating_point` (rates, intervals, target-FRR threshold), :mod:`.collect`
(scoring the test split through the pipeline), :mod:`.analyze` (the report document),
:mod:`.plots`, :mod:`.page` (self-contained HTML), :mod:`.build` (the whole run, atomic write).
"""

from o2n_edge.acceptance.report_builder import (
    REPORT_HTML,
    REPORT_JSON,
    ReportSummary,
    build_report,
    require_report_extra,
)

__all__ = ["REPORT_HTML", "REPORT_JSON", "ReportSummary", "build_report", "require_report_extra"]
