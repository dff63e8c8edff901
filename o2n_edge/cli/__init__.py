"""The `o2n-edge` command line: a thin typer layer over plain library functions, one module per job.

`common` holds the app and shared options; each command module registers its commands on import,
in the order `--help` lists them (the data flow: offline stage, bundle, line side, benchmarks).
"""

from o2n_edge.cli.common import app
from o2n_edge.cli import offline_cmds  # noqa: F401,I001  (registers eval, personalize, distill, transform)
from o2n_edge.cli import bundle_cmds  # noqa: F401  (export, build-engines, inspect)
from o2n_edge.cli import runtime_cmds  # noqa: F401  (infer, serve, results)
from o2n_edge.cli import learn_cmd  # noqa: F401  (learn, learn --rollback)
from o2n_edge.cli import triton_cmd  # noqa: F401  (triton)
from o2n_edge.cli import report_cmd  # noqa: F401  (report)
from o2n_edge.cli import bench_cmd  # noqa: F401  (bench)
from o2n_edge.cli import doctor_cmd  # noqa: F401  (doctor)

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry
    app()
