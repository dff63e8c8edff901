"""Hot reload: swap the served bundle without dropping or mixing requests.

Why a reference swap and not a lock around inference: each request reads
:attr:`InspectorSlot.current` once, when it starts, and uses that inspector to the end (its
answer and its log row name that inspector's bundle hash). A reload loads and verifies the new
bundle on its own thread while the old one keeps serving, then replaces the reference in one
assignment: requests already running finish on the old inspector (it is freed when the last of
them lets go), later ones get the new one, and nothing waits on the swap. A bundle that fails
to load or verify is refused with the reason, and the old one keeps serving.

Two ways in: ``POST /v1/admin/reload`` (admin token; 403 while no admin token is configured)
and SIGHUP (``serve`` installs :func:`install_sighup`), both reloading the path ``serve`` was
started with unless the request names another.

Runtime rule: nothing here may import torch.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from o2n_edge.runtime.http_input import ApiError, bearer_checker
from o2n_edge.runtime.types import Inspector

logger = logging.getLogger("o2n_edge.reload")

Loader = Callable[[Path], Inspector]


class ReloadRefused(Exception):
    """The new bundle was not swapped in (``status``: the HTTP answer it maps to)."""

    def __init__(self, detail: str, status: int = 409) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


def default_loader(path: Path, like: Any = None) -> Inspector:
    """Open a bundle on ONNX Runtime with the session options of the inspector it replaces.

    Imported lazily: a server built around a test double never needs onnxruntime.
    """
    from o2n_edge.runtime.pipeline import OrtPipeline

    return OrtPipeline(path, getattr(like, "options", None))


class InspectorSlot:
    """The one inspector requests use now, and the bundle path a reload defaults to.

    ``on_swap(inspector)`` runs after each swap (the server updates its metrics there).
    """

    def __init__(
        self,
        inspector: Inspector,
        bundle_path: str | Path | None = None,
        loader: Loader | None = None,
        on_swap: Callable[[Inspector], None] | None = None,
    ) -> None:
        self.current: Inspector = inspector
        self.bundle_path = Path(bundle_path) if bundle_path is not None else None
        self.loader: Loader = loader or (lambda p: default_loader(p, self.current))
        self.on_swap = on_swap
        self.reloads = 0
        self._reloading = threading.Lock()

    def reload(self, path: str | Path | None = None) -> dict[str, Any]:
        """Load + verify ``path`` (default: the start path), then swap; blocking.

        Returns ``{"bundle_hash": new, "previous": old, "bundle": path}``; raises
        :class:`ReloadRefused` when the bundle does not load (the old one keeps serving) or
        another reload is still running.
        """
        target = Path(path) if path is not None else self.bundle_path
        if target is None:
            raise ReloadRefused("no bundle path: name one ({\"bundle\": \"/path\"})", 422)
        if not self._reloading.acquire(blocking=False):
            raise ReloadRefused("another reload is in progress; try again when it is done")
        try:
            try:
                new = self.loader(target)
            except Exception as exc:  # noqa: BLE001 - any failure to load is a refusal
                logger.warning("reload of %s refused, still serving %s: %s", target,
                               self.current.bundle_hash[:12], exc)
                raise ReloadRefused(f"bundle {target} refused: {exc}") from exc
            if not getattr(new, "bundle_hash", None):
                raise ReloadRefused(f"bundle {target} refused: the loaded inspector has no bundle hash")
            previous = self.current.bundle_hash
            self.current = new  # the swap: one reference assignment
            self.reloads += 1
            if self.on_swap is not None:
                self.on_swap(new)
            logger.warning("reloaded bundle %s: %s -> %s", target, previous[:12], new.bundle_hash[:12])
            return {"bundle_hash": new.bundle_hash, "previous": previous, "bundle": str(target)}
        finally:
            self._reloading.release()


class ReloadBody(BaseModel):
    """Body of ``POST /v1/admin/reload`` (may be empty)."""

    bundle: str | None = Field(None, max_length=4096, description="bundle directory; default: serve's --bundle")


def reload_router(
    slot: InspectorSlot, admin_token: str | None, on_result: Callable[[bool], None] | None = None
) -> APIRouter:
    """``POST /v1/admin/reload``: 403 without an admin token configured, 401 with a wrong one."""
    router = APIRouter()
    check = bearer_checker(admin_token)

    def require_admin(request: Request) -> None:
        if admin_token is None:
            raise ApiError(403, "forbidden", "reload is disabled: start serve with --admin-token")
        check(request)

    @router.post("/v1/admin/reload", dependencies=[Depends(require_admin)],
                 summary="Swap to a new (verified) bundle without dropping requests")
    async def reload(body: ReloadBody | None = None) -> JSONResponse:
        """Load and verify in the background; 200 with the new and previous hash, or 409."""
        try:
            answer = await asyncio.to_thread(slot.reload, body.bundle if body else None)
        except ReloadRefused as exc:
            if on_result is not None:
                on_result(False)
            raise ApiError(exc.status, "reload refused", exc.detail)
        if on_result is not None:
            on_result(True)
        return JSONResponse(answer)

    return router


def install_sighup(slot: InspectorSlot, on_result: Callable[[bool], None] | None = None) -> bool:
    """Make SIGHUP reload the start path on a background thread; False where there is no SIGHUP.

    The handler only starts a thread: loading a bundle takes seconds and must not run inside a
    signal handler (or block the event loop that runs on the main thread).
    """
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return False

    def run() -> None:
        try:
            slot.reload()
        except ReloadRefused as exc:
            logger.warning("SIGHUP reload refused: %s", exc.detail)
            ok = False
        else:
            ok = True
        if on_result is not None:
            on_result(ok)

    def handler(_signum: int, _frame: object) -> None:
        threading.Thread(target=run, name="o2n-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, handler)
    return True
