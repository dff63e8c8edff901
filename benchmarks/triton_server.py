"""Start the real ``tritonserver`` that the PyPI wheel ``nvidia-pytriton`` carries, on loopback.

For the tests and the benchmark (and for trying a repository on a workstation): production runs
NVIDIA's Triton container instead (README "Scale out"). What this takes care of:

- the wheel ships one Python-backend stub per Python version; the one matching this interpreter
  is copied into a private copy of ``backends/python/`` (as pytriton itself does);
- the server's bundled libraries are found through LD_LIBRARY_PATH;
- Triton's Python stub ignores PYTHONPATH, so the models find numpy, onnxruntime and o2n-edge
  through ``O2N_TRITON_SITE_DIRS`` (this interpreter's site-packages; see ``python_models``);
- HTTP, gRPC and metrics listen on 127.0.0.1 only, on free ports; never on 0.0.0.0.

:func:`unavailable` says why the server cannot run here (a clear skip reason), or None.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import platform
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
MIN_GLIBC = (2, 35)
INSTALL_HINT = "pip install 'o2n-edge[triton]'"
SITE_ENV = "O2N_TRITON_SITE_DIRS"  # read by the models' model.py (see python_models.MODEL_PY)


def _pytriton_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _glibc() -> tuple[int, int] | None:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return None
    major, minor = (int(x) for x in version.split(".")[:2])
    return major, minor


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def unavailable() -> str | None:
    """Why the wheel's tritonserver cannot run here, or None when it can."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the nvidia-pytriton tritonserver is built for x86-64 Linux, not {sys.platform}/{platform.machine()}"
    glibc = _glibc()
    if glibc is None or glibc < MIN_GLIBC:
        return f"tritonserver needs glibc >= {MIN_GLIBC[0]}.{MIN_GLIBC[1]}, this system has {glibc}"
    root = _pytriton_root()
    if root is None:
        return f"nvidia-pytriton is not installed ({INSTALL_HINT})"
    dist = root / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        return f"{dist}/bin/tritonserver is missing from the nvidia-pytriton install"
    if not (dist / "python_backend_stubs" / _python_version() / "triton_python_backend_stub").is_file():
        return f"nvidia-pytriton has no Python-backend stub for Python {_python_version()}"
    if ctypes.util.find_library(f"python{_python_version()}") is None:
        return (f"the Python-backend stub needs the shared library libpython{_python_version()}.so "
                f"(Debian/Ubuntu: apt install libpython{_python_version()})")
    for module in ("tritonclient.http", "tritonclient.grpc"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return f"tritonclient is not installed ({INSTALL_HINT})"
    if not os.environ.get(SITE_ENV):
        import numpy

        if int(numpy.__version__.split(".")[0]) >= 2:  # measured: the stub dies at the first request
            return (f"the wheel's Python-backend stub needs numpy < 2 in the models' Python, this "
                    f"environment has numpy {numpy.__version__} ({INSTALL_HINT} installs a matching "
                    f"one; or point {SITE_ENV} at a site-packages folder with numpy < 2)")
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def site_dirs() -> list[str]:
    """Where the models find their packages: $O2N_TRITON_SITE_DIRS first, then this interpreter's
    site-packages (editable o2n-edge included, via their .pth files)."""
    given = [d for d in os.environ.get(SITE_ENV, "").split(os.pathsep) if d]
    dirs = [*given, *site.getsitepackages(), site.getusersitepackages()]
    return [d for d in dirs if Path(d).is_dir()]


class LocalTriton:
    """One tritonserver process serving ``repository`` on loopback; a context manager.

    ``models``: load only these (explicit model control), e.g. the self-contained model of a
    repository whose onnxruntime graph models this Triton build cannot serve.
    """

    def __init__(self, repository: str | Path, models: list[str] | None = None,
                 log_path: str | Path | None = None, extra_args: list[str] | None = None) -> None:
        why = unavailable()
        if why:
            raise RuntimeError(why)
        self.repository = Path(repository).resolve()
        self.models = models
        self.http_port, self.grpc_port = free_port(), free_port()
        self.http_url = f"{LOOPBACK}:{self.http_port}"
        self.grpc_url = f"{LOOPBACK}:{self.grpc_port}"
        self._work = Path(tempfile.mkdtemp(prefix="o2n-triton-"))
        self.log_path = Path(log_path) if log_path else self._work / "tritonserver.log"
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None

    def _prepare(self) -> Path:
        root = _pytriton_root()
        assert root is not None
        dist = self._work / "tritonserver"
        shutil.copytree(root / "tritonserver", dist, ignore=shutil.ignore_patterns("python_backend_stubs"))
        stub = root / "tritonserver" / "python_backend_stubs" / _python_version() / "triton_python_backend_stub"
        shutil.copy2(stub, dist / "backends" / "python" / "triton_python_backend_stub")
        return dist

    def start(self, timeout_s: float = START_TIMEOUT_S) -> "LocalTriton":
        dist = self._prepare()
        libs = _pytriton_root().parent / "nvidia_pytriton.libs"  # type: ignore[union-attr]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (env.get("LD_LIBRARY_PATH"), str(libs)) if p)
        env[SITE_ENV] = os.pathsep.join(site_dirs())
        args = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={self.repository}",
            f"--backend-directory={dist / 'backends'}",
            f"--cache-directory={dist / 'caches'}",
            f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
            f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
        ]
        if self.models is not None:
            args.append("--model-control-mode=explicit")
            args += [f"--load-model={m}" for m in self.models]
        args += self.extra_args
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (Triton drains in-flight requests), SIGKILL after STOP_TIMEOUT_S."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the stubs go too
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        # failures raised with the log's tail already; a log asked for elsewhere is kept
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
