"""The VRAM ledger: which models are loaded, what each is charged, and who may load next.

One ledger per backend process. All bookkeeping happens on the event loop (so it needs no
locks); only the blocking load itself runs in a thread executor, which keeps the service
answering while a model loads. A load reserves its estimate *before* it starts, so two
concurrent loads can never overcommit the budget, and concurrent requests for the same
model share one in-flight load.

When a load does not fit, the policy decides: ``"evict"`` (the MMA) unloads least-recently
used idle models until it fits, never one serving a request; ``"refuse"`` (the MMS) raises
``InsufficientVram``. Models idle longer than ``idle_unload_s`` are unloaded by
``run_idle_reaper``.

Invariant (``check``): ``used_mb()`` equals the sum of the entries' charges; only
``loading`` and ``online`` entries are charged; estimates never exceed the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import importlib.util
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Literal

import msgspec

from backends.loaders import Loader, ModelHandle, load_model
from backends.registry import BudgetSpec, ModelSpec, Registry

log = logging.getLogger(__name__)

OnFull = Literal["evict", "refuse"]
#: Name prefix of the executor threads that load models and generate.
LEDGER_THREAD_PREFIX = "ledger"


class ModelState(enum.StrEnum):
    """A model's place in its life cycle, as both dialects report it."""

    AVAILABLE = "available_not_loaded"
    LOADING = "loading"
    ONLINE = "online"
    ERROR = "error"


class LedgerError(Exception):
    """Base of everything the ledger refuses; ``str()`` is the client-facing message."""


class UnknownModel(LedgerError):
    """The name is not in the registry."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Unknown model: {name}")
        self.name = name


class UnknownVram(LedgerError):
    """The model has no ``estimated_vram_mb``, so it cannot be charged."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Unknown VRAM requirement for model {name}")
        self.name = name


class InsufficientVram(LedgerError):
    """The load does not fit (after evicting what may be evicted)."""

    def __init__(self, need_mb: int, free_mb: int, budget_mb: int) -> None:
        super().__init__(
            f"Insufficient VRAM: need {need_mb} MB, {free_mb} MB free of {budget_mb} MB"
        )
        self.need_mb = need_mb
        self.free_mb = free_mb
        self.budget_mb = budget_mb


class ModelLoadFailed(LedgerError):
    """The loader raised; the entry is now in state ``error`` with this message."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"Failed to load model {name}: {reason}")
        self.name = name
        self.reason = reason


class ModelBusy(LedgerError):
    """An unload was asked for while the model is serving requests."""

    def __init__(self, name: str, in_use: int) -> None:
        super().__init__(f"Model {name} is serving {in_use} request(s); not unloaded")
        self.name = name


class EntrySnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A copy of one ledger entry, safe to hand out."""

    name: str
    type: str
    state: ModelState
    charged_mb: int
    estimated_vram_mb: int | None
    measured: bool
    quantization: str
    last_used: float | None
    in_use: int
    error: str | None


class LedgerStats(msgspec.Struct, kw_only=True):
    """Counters of what the ledger has done since start."""

    loads: int = 0
    load_failures: int = 0
    unloads: int = 0
    evictions: int = 0
    idle_unloads: int = 0
    refusals: int = 0


class _Entry:
    """Mutable per-model bookkeeping; only touched on the event loop."""

    __slots__ = ("charged", "error", "handle", "in_use", "last_used", "measured", "name",
                 "pending", "spec", "state")

    def __init__(self, name: str, spec: ModelSpec) -> None:
        self.name = name
        self.spec = spec
        self.state = ModelState.AVAILABLE
        self.charged = 0
        self.measured = False
        self.last_used: float | None = None
        self.in_use = 0
        self.error: str | None = None
        self.handle: ModelHandle | None = None
        self.pending: asyncio.Task[None] | None = None


def detect_budget(spec: BudgetSpec, override_mb: int | None = None) -> tuple[int, str]:
    """The budget in MB and the device name.

    An explicit override wins. Otherwise, when a CUDA device is visible, ``gpu_fraction``
    of its memory; torch is consulted only if it is already imported or an NVIDIA driver
    is present (importing it costs seconds). Else the configured ``vram_mb`` on the CPU.
    """
    total = _cuda_total_mb()
    device = "cuda:0" if total is not None else "cpu"
    if override_mb is not None:
        return override_mb, device
    if total is not None:
        return int(total * spec.gpu_fraction), device
    return spec.vram_mb, device


def _cuda_total_mb() -> int | None:
    torch: Any = sys.modules.get("torch")
    if torch is None:
        if not os.path.isdir("/proc/driver/nvidia/gpus"):
            return None
        if importlib.util.find_spec("torch") is None:
            return None
        torch = importlib.import_module("torch")
    try:
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.get_device_properties(0).total_memory // (1024 * 1024))
    except Exception:  # a broken driver is "no GPU", not a crash
        log.exception("CUDA probe failed; using the configured budget")
        return None


class VramLedger:
    """Charges, states and last-used times of every configured model; see module doc."""

    def __init__(
        self,
        registry: Registry,
        *,
        budget_mb: int,
        on_full: OnFull,
        idle_unload_s: float | None = None,
        loader: Loader = load_model,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._entries = {name: _Entry(name, spec) for name, spec in registry.models.items()}
        self._budget = budget_mb
        self._on_full: OnFull = on_full
        self.idle_unload_s = (
            registry.budget.idle_unload_s if idle_unload_s is None else idle_unload_s
        )
        self._loader = loader
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(4, thread_name_prefix=LEDGER_THREAD_PREFIX)
        self._clock = clock
        self._used = 0
        self._closed = False
        self.stats = LedgerStats()

    # -- reading -------------------------------------------------------------------------

    @property
    def budget_mb(self) -> int:
        """The budget in MB."""
        return self._budget

    @property
    def on_full(self) -> OnFull:
        """What a load that does not fit does: evict (MMA) or refuse (MMS)."""
        return self._on_full

    def used_mb(self) -> int:
        """MB charged to loading and online models."""
        return self._used

    def free_mb(self) -> int:
        """Budget minus used (never negative)."""
        return max(0, self._budget - self._used)

    def entries(self) -> dict[str, EntrySnapshot]:
        """A snapshot of every configured model, in configuration order."""
        return {name: self._snapshot(e) for name, e in self._entries.items()}

    def entry(self, name: str) -> EntrySnapshot:
        """A snapshot of one model; raises ``UnknownModel``."""
        return self._snapshot(self._get(name))

    def charged(self) -> dict[str, EntrySnapshot]:
        """Snapshots of the models holding memory (loading or online)."""
        held = (ModelState.LOADING, ModelState.ONLINE)
        return {n: s for n, s in self.entries().items() if s.state in held}

    def check(self) -> None:
        """Raise ``AssertionError`` if the totals disagree with the entries."""
        total = sum(e.charged for e in self._entries.values())
        if total != self._used:
            raise AssertionError(f"ledger total {self._used} MB != sum of entries {total} MB")
        for e in self._entries.values():
            charged_state = e.state in (ModelState.LOADING, ModelState.ONLINE)
            if e.charged < 0 or (not charged_state and e.charged != 0):
                raise AssertionError(f"{e.name}: charged {e.charged} MB in state {e.state}")
            if charged_state and not e.measured and e.charged != e.spec.estimated_vram_mb:
                raise AssertionError(f"{e.name}: charged {e.charged} MB, estimate differs")
            if e.in_use < 0 or (e.in_use and e.state is not ModelState.ONLINE):
                raise AssertionError(f"{e.name}: in_use {e.in_use} in state {e.state}")
            if (e.state is ModelState.ONLINE) != (e.handle is not None):
                raise AssertionError(f"{e.name}: handle presence does not match {e.state}")
        if not any(e.measured for e in self._entries.values()) and self._used > self._budget:
            raise AssertionError(f"used {self._used} MB exceeds budget {self._budget} MB")

    # -- changing ------------------------------------------------------------------------

    async def ensure_loaded(self, name: str) -> bool:
        """Load ``name`` if needed (sharing an in-flight load). True if it was not online."""
        entry = self._get(name)
        was_online = entry.state is ModelState.ONLINE
        await self._acquire(entry)
        entry.last_used = self._clock()
        return not was_online

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[ModelHandle]:
        """Load ``name`` if needed and hold it in use (not evictable) inside the block."""
        entry = self._get(name)
        await self._acquire(entry)
        handle = entry.handle
        assert handle is not None  # _acquire returned in the same step it saw ONLINE
        entry.in_use += 1
        try:
            yield handle
        finally:
            entry.in_use -= 1
            entry.last_used = self._clock()

    async def unload(self, name: str) -> bool:
        """Unload ``name``; False if it was not loaded. Raises ``ModelBusy`` while in use."""
        entry = self._get(name)
        if entry.state is ModelState.LOADING and entry.pending is not None:
            with contextlib.suppress(LedgerError):
                await asyncio.shield(entry.pending)
        if entry.state is not ModelState.ONLINE:
            return False
        if entry.in_use:
            raise ModelBusy(name, entry.in_use)
        self._release(entry, reason="unload")
        self.stats.unloads += 1
        return True

    async def run_in_executor(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work (generation) on the ledger's executor."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload every online model unused for ``idle_unload_s``; returns their names."""
        now = self._clock() if now is None else now
        gone: list[str] = []
        for e in self._entries.values():
            if (
                e.state is ModelState.ONLINE
                and e.in_use == 0
                and e.last_used is not None
                and now - e.last_used >= self.idle_unload_s
            ):
                self._release(e, reason="idle")
                self.stats.idle_unloads += 1
                gone.append(e.name)
        return gone

    async def run_idle_reaper(self, interval_s: float | None = None) -> None:
        """Call ``unload_idle`` periodically until cancelled."""
        interval = interval_s or min(30.0, max(0.05, self.idle_unload_s / 4))
        while True:
            await asyncio.sleep(interval)
            for name in self.unload_idle():
                log.info("unloaded %s: idle for %.0f s", name, self.idle_unload_s)

    async def close(self) -> None:
        """Unload everything (even models in use: the process is going away)."""
        self._closed = True
        pending = [e.pending for e in self._entries.values() if e.pending is not None]
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task
        for e in self._entries.values():
            if e.state is ModelState.ONLINE:
                self._release(e, reason="shutdown")
            elif e.state is ModelState.LOADING:  # its task was cancelled before it ran
                self._uncharge(e, ModelState.AVAILABLE)
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- internals -----------------------------------------------------------------------

    def _get(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownModel(name)
        return entry

    def _snapshot(self, e: _Entry) -> EntrySnapshot:
        return EntrySnapshot(
            name=e.name,
            type=e.spec.type,
            state=e.state,
            charged_mb=e.charged,
            estimated_vram_mb=e.spec.estimated_vram_mb,
            measured=e.measured,
            quantization=e.spec.quantization,
            last_used=e.last_used,
            in_use=e.in_use,
            error=e.error,
        )

    async def _acquire(self, entry: _Entry) -> None:
        """Return once ``entry`` is online, loading it (once) if needed.

        Returns in the same loop step that observed ONLINE, so the caller can mark the
        model in use before anything else runs (and could evict it).
        """
        while entry.state is not ModelState.ONLINE:
            if self._closed:
                raise LedgerError("Backend is shutting down")
            if entry.state is not ModelState.LOADING:
                self._reserve(entry)
                task = asyncio.get_running_loop().create_task(self._load(entry))
                task.add_done_callback(_consume_exception)
                entry.pending = task
            assert entry.pending is not None
            await asyncio.shield(entry.pending)

    def _reserve(self, entry: _Entry) -> None:
        """Charge the estimate before loading, evicting or refusing as the policy says."""
        need = entry.spec.estimated_vram_mb
        if need is None:
            raise UnknownVram(entry.name)
        if need > self.free_mb():
            victims = self._victims(need) if self._on_full == "evict" else None
            if victims is None:
                self.stats.refusals += 1
                raise InsufficientVram(need, self.free_mb(), self._budget)
            for victim in victims:
                log.info("evicting %s (%d MB) to load %s", victim.name, victim.charged, entry.name)
                self._release(victim, reason="evicted")
                self.stats.evictions += 1
        entry.state = ModelState.LOADING
        entry.error = None
        entry.charged = need
        entry.measured = False
        self._used += need

    def _victims(self, need: int) -> list[_Entry] | None:
        """Least-recently-used idle online models whose unloading makes ``need`` fit."""
        idle = sorted(
            (e for e in self._entries.values() if e.state is ModelState.ONLINE and not e.in_use),
            key=lambda e: (e.last_used or 0.0, e.name),
        )
        chosen: list[_Entry] = []
        free = self.free_mb()
        for e in idle:
            if free >= need:
                break
            chosen.append(e)
            free += e.charged
        return chosen if free >= need else None

    async def _load(self, entry: _Entry) -> None:
        """Run the loader in the executor and settle the entry's state either way."""
        started = time.perf_counter()
        try:
            handle = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._loader, entry.spec
            )
        except asyncio.CancelledError:
            self._uncharge(entry, ModelState.AVAILABLE)
            raise
        except Exception as exc:
            self._uncharge(entry, ModelState.ERROR)
            entry.error = str(exc) or type(exc).__name__
            self.stats.load_failures += 1
            log.warning("loading %s failed: %s", entry.name, entry.error)
            raise ModelLoadFailed(entry.name, entry.error) from exc
        finally:
            entry.pending = None
        measured = handle.measured_vram_mb
        if measured is not None:
            self._used += measured - entry.charged
            entry.charged = measured
            entry.measured = True
        entry.handle = handle
        entry.state = ModelState.ONLINE
        entry.last_used = self._clock()
        self.stats.loads += 1
        log.info(
            "loaded %s in %.3f s (%d MB; %d/%d MB used)",
            entry.name, time.perf_counter() - started, entry.charged, self._used, self._budget,
        )

    def _uncharge(self, entry: _Entry, state: ModelState) -> None:
        self._used -= entry.charged
        entry.charged = 0
        entry.measured = False
        entry.state = state

    def _release(self, entry: _Entry, *, reason: str) -> None:
        """Unload an online entry and return its charge, in one loop step."""
        handle = entry.handle
        entry.handle = None
        self._uncharge(entry, ModelState.AVAILABLE)
        log.info("unloaded %s (%s); %d/%d MB used", entry.name, reason, self._used, self._budget)
        if handle is not None:
            try:
                handle.unload()
            except Exception:
                log.exception("unloading %s raised", entry.name)


def _consume_exception(task: asyncio.Task[None]) -> None:
    """Mark a load task's exception as seen: its waiters may all have gone away."""
    if not task.cancelled():
        task.exception()
