"""One set of processes per setting of the compatibility corpus (module-scoped)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Backend, req, start_backend
from tests.reliability.helpers import wait_until
from tests.shimproc import ROOT, ShimProc, shim_config, start_shim

MODELS_TOML = ROOT / "config" / "models.toml"
WEIGHTS = {"100/0": (100, 0), "50/50": (50, 50), "0/100": (0, 100), "retired": (0, 100)}


@dataclass
class Target:
    """Where the corpus is sent in one setting, and the processes behind it."""

    setting: str
    endpoint: str
    mma: Backend
    mms: Backend | None = None
    shim: ShimProc | None = None
    timings: dict[str, float] = field(default_factory=dict)


def compat_config(mma: Backend, mms: Backend, tmp: Path, weights: tuple[int, int],
                  **sections: object) -> dict[str, object]:
    """The shim as deployed (ownership on, defaults of this branch), on free ports."""
    cfg = shim_config({"mma": mma, "mms": mms}, tmp,
                      routing={"weights": {"mma": weights[0], "mms": weights[1]}},
                      ownership={"enabled": True, "poll_interval_ms": 500},
                      **sections)
    cfg["models_file"] = str(MODELS_TOML)
    cfg.pop("policy", None)  # from models_file, as `make run` does
    cfg["shim"] = {**cfg["shim"], "reconnect_grace_ms": 300}  # type: ignore[dict-item]
    for name in ("mma", "mms"):  # one machine: one budget in the merged view
        cfg["backends"][name]["device"] = "MainPC"  # type: ignore[index]
    return cfg


def backends_of(shim: ShimProc) -> dict[str, Any]:
    """Each backend's state as the shim sees it (healthy, inflight, VRAM): the admin
    ``status`` reply's health details (the health socket itself tells only the legacy
    fields)."""
    backends: dict[str, Any] = shim.status()["health"]["details"]["backends"]
    return backends


def _mma_gone(shim: ShimProc) -> bool:
    return not backends_of(shim)["mma"]["healthy"]


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    setting: str = request.param
    tmp = tmp_path_factory.mktemp(setting.replace("/", "-"))
    mma = start_backend("mma")
    if setting == "direct":
        yield Target(setting, mma.endpoint, mma)
        mma.stop()
        return
    mms = start_backend("mms")
    shim = start_shim(compat_config(mma, mms, tmp, WEIGHTS[setting]), tmp)
    try:
        wait_until(lambda: all(b["healthy"] for b in
                               backends_of(shim).values()),
                   20, "both backends healthy")
        if setting == "retired":
            mma.stop()
            wait_until(lambda: _mma_gone(shim), 20, "the shim to see MMA gone")
            req(shim.endpoint, {"command": "HEALTH_CHECK"}, timeout=10)
        yield Target(setting, shim.endpoint, mma, mms, shim)
    finally:
        shim.stop()
        mms.stop()
        mma.stop()
