"""Build-time check of a GPU image: numpy, onnxruntime and tensorrt import, and the providers it has.

Why: an image whose onnxruntime cannot import (the Jetson onnxruntime-gpu 1.23 wheel under
numpy 2, for one) still builds, and ``serve`` only dies when the container starts on the line.
Running this as the image's last build step makes such an image fail to build instead, and its
output (versions, providers) is in the build log. Standard library only; run by the Dockerfiles:

    python check_image.py --need CUDAExecutionProvider --need TensorrtExecutionProvider --tensorrt
"""

from __future__ import annotations

import argparse
import sys


def check(need: list[str], tensorrt: bool) -> list[str]:
    """Problems found (empty = the image can serve); versions and providers are printed as found."""
    problems: list[str] = []
    try:
        import numpy

        print(f"numpy {numpy.__version__}")
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return [f"numpy does not import: {type(exc).__name__}: {exc}"]
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
        print(f"onnxruntime {ort.__version__}: providers {', '.join(providers)}")
        problems += [f"onnxruntime has no {p} (providers: {', '.join(providers)})" for p in need if p not in providers]
    except Exception as exc:  # noqa: BLE001
        problems.append(f"onnxruntime does not import with numpy {numpy.__version__}: {type(exc).__name__}: {exc}")
    if tensorrt:
        try:
            import tensorrt as trt

            print(f"tensorrt {trt.__version__}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"tensorrt does not import: {type(exc).__name__}: {exc}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Exit 1 (failing the image build) with every problem printed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--need", action="append", default=[], help="an execution provider onnxruntime must list")
    p.add_argument("--tensorrt", action="store_true", help="tensorrt must import too")
    a = p.parse_args(argv)
    problems = check(a.need, a.tensorrt)
    for line in problems:
        print(f"image check: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
