"""The VRAM ledger: policies, sharing of in-flight loads, and its totals under concurrency."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from backends.ledger import (
    InsufficientVram,
    ModelBusy,
    ModelLoadFailed,
    ModelState,
    OnFull,
    UnknownModel,
    UnknownVram,
    VramLedger,
)
from backends.loaders import ModelHandle
from backends.registry import ModelSpec, Registry
from tests.reliability.helpers import wait_until_async


class FakeHandle:
    """A model that 'generates' by sleeping briefly in its thread."""

    def __init__(self, name: str, measured: int | None) -> None:
        self.name = name
        self.unloaded = False
        self._measured = measured

    @property
    def measured_vram_mb(self) -> int | None:
        return self._measured

    def generate(self, prompt: str, max_tokens: int, temperature: float, top_p: float,
                 stop: Sequence[str], seed: int | None) -> tuple[str, int]:
        assert not self.unloaded, "generate on an unloaded handle"
        time.sleep(0.001)
        return f"{self.name}:{prompt}", max_tokens

    def unload(self) -> None:
        self.unloaded = True


class FakeLoader:
    """Counts loads; sleeps ``delay`` s; fails for names in ``broken``."""

    def __init__(self, delay: float = 0.0, broken: Sequence[str] = (),
                 measured: dict[str, int] | None = None) -> None:
        self.delay = delay
        self.broken = set(broken)
        self.measured = measured or {}
        self.loads: Counter[str] = Counter()
        self.started = threading.Event()  # a load is under way (set by the first)
        self._lock = threading.Lock()

    def __call__(self, spec: ModelSpec) -> ModelHandle:
        name = Path(spec.path).name
        with self._lock:
            self.loads[name] += 1
        self.started.set()
        time.sleep(self.delay)
        if name in self.broken:
            raise OSError(f"{name}: file is corrupt")
        return FakeHandle(name, self.measured.get(name))


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, s: float = 1.0) -> float:
        self.now += s
        return self.now


def registry(sizes: dict[str, int | None]) -> Registry:
    models = {
        name: {"loader": "ngram", "path": f"/fake/{name}", "estimated_vram_mb": mb}
        for name, mb in sizes.items()
    }
    for body in models.values():
        if body["estimated_vram_mb"] is None:
            del body["estimated_vram_mb"]
    return Registry.from_dict({"models": models}, source=Path("/fake/models.toml"))


def ledger(sizes: dict[str, int | None], budget: int, on_full: OnFull = "evict",
           loader: FakeLoader | None = None, clock: Callable[[], float] | None = None,
           idle: float = 300.0) -> VramLedger:
    return VramLedger(registry(sizes), budget_mb=budget, on_full=on_full,
                      loader=loader or FakeLoader(), clock=clock or Clock(), idle_unload_s=idle)


def online(led: VramLedger) -> set[str]:
    return {n for n, s in led.entries().items() if s.state is ModelState.ONLINE}


async def test_concurrent_requests_share_one_load() -> None:
    loader = FakeLoader(delay=0.05)
    led = ledger({"a": 100}, 1000, loader=loader)

    async def gen(i: int) -> str:
        async with led.use("a") as handle:
            text, _ = await led.run_in_executor(handle.generate, str(i), 1, 0.0, 1.0, [], None)
            return str(text)

    results = await asyncio.gather(*(gen(i) for i in range(20)), led.ensure_loaded("a"))
    assert loader.loads["a"] == 1
    assert results[:20] == [f"a:{i}" for i in range(20)]
    led.check()
    assert led.used_mb() == 100
    await led.close()


async def test_mma_policy_evicts_least_recently_used() -> None:
    clock = Clock()
    led = ledger({"a": 1000, "b": 1000, "c": 1000, "d": 1500}, 3000, clock=clock)
    for name in "abc":
        await led.ensure_loaded(name)
        clock.tick()
    async with led.use("a"):  # a becomes most recently used
        pass
    clock.tick()
    await led.ensure_loaded("d")  # needs 1500: evicts b (oldest) and c
    assert online(led) == {"a", "d"}
    assert led.used_mb() == 2500
    assert led.stats.evictions == 2
    led.check()
    await led.close()


async def test_model_in_use_is_never_evicted() -> None:
    clock = Clock()
    led = ledger({"a": 1000, "b": 1000, "c": 2000}, 2000, clock=clock)
    await led.ensure_loaded("a")
    clock.tick()
    await led.ensure_loaded("b")
    release = asyncio.Event()
    entered = asyncio.Event()

    async def hold(name: str) -> None:
        async with led.use(name):
            entered.set()
            await release.wait()

    holder = asyncio.create_task(hold("a"))  # a is the LRU model, but busy
    await entered.wait()
    with pytest.raises(InsufficientVram, match="need 2000 MB, 0 MB free of 2000 MB"):
        await led.ensure_loaded("c")  # only b is evictable: not enough, so nothing goes
    assert online(led) == {"a", "b"}
    with pytest.raises(ModelBusy):
        await led.unload("a")
    release.set()
    await holder
    await led.ensure_loaded("c")
    assert online(led) == {"c"}
    led.check()
    await led.close()


async def test_mms_policy_refuses() -> None:
    led = ledger({"a": 1500, "b": 1000}, 2000, on_full="refuse")
    await led.ensure_loaded("a")
    with pytest.raises(InsufficientVram) as info:
        await led.ensure_loaded("b")
    assert str(info.value) == "Insufficient VRAM: need 1000 MB, 500 MB free of 2000 MB"
    assert online(led) == {"a"}
    assert led.stats.refusals == 1
    led.check()
    await led.close()


async def test_too_big_unknown_vram_and_unknown_model() -> None:
    led = ledger({"huge": 5000, "mystery": None}, 2000)
    with pytest.raises(InsufficientVram, match="need 5000 MB, 2000 MB free of 2000 MB"):
        await led.ensure_loaded("huge")
    with pytest.raises(UnknownVram):
        await led.ensure_loaded("mystery")
    with pytest.raises(UnknownModel, match="Unknown model: nope"):
        await led.ensure_loaded("nope")
    assert led.used_mb() == 0
    led.check()


async def test_failed_load_sets_error_then_retries() -> None:
    loader = FakeLoader(delay=0.01, broken=["bad"])
    led = ledger({"bad": 500}, 1000, loader=loader)
    results = await asyncio.gather(*(led.ensure_loaded("bad") for _ in range(3)),
                                   return_exceptions=True)
    assert all(isinstance(r, ModelLoadFailed) for r in results)
    assert loader.loads["bad"] == 1  # the waiters shared the one failed load
    snap = led.entry("bad")
    assert snap.state is ModelState.ERROR
    assert snap.error == "bad: file is corrupt"
    assert led.used_mb() == 0
    led.check()
    loader.broken.clear()
    assert await led.ensure_loaded("bad") is True
    assert led.entry("bad").state is ModelState.ONLINE
    assert led.entry("bad").error is None
    await led.close()


async def test_measured_vram_replaces_estimate() -> None:
    led = ledger({"a": 500}, 1000, loader=FakeLoader(measured={"a": 640}))
    await led.ensure_loaded("a")
    assert led.used_mb() == 640
    assert led.entry("a").measured
    led.check()
    await led.unload("a")
    assert led.used_mb() == 0
    led.check()


async def test_idle_models_are_unloaded() -> None:
    clock = Clock()
    led = ledger({"a": 100, "b": 100}, 1000, clock=clock, idle=60)
    await led.ensure_loaded("a")
    clock.tick(30)
    await led.ensure_loaded("b")
    clock.tick(31)
    assert led.unload_idle() == ["a"]
    assert online(led) == {"b"}
    reaper = asyncio.create_task(led.run_idle_reaper(interval_s=0.01))
    clock.tick(60)
    await wait_until_async(lambda: online(led) == set(), 10.0, "the reaper unloading b")
    reaper.cancel()
    assert led.stats.idle_unloads == 2
    led.check()


async def test_unload_waits_for_in_flight_load() -> None:
    loader = FakeLoader(delay=1.0)
    led = ledger({"a": 100}, 1000, loader=loader)
    load = asyncio.create_task(led.ensure_loaded("a"))
    assert await asyncio.to_thread(loader.started.wait, 10.0), "the load never began"
    assert led.entry("a").state is ModelState.LOADING
    assert led.used_mb() == 100  # charged while loading
    assert await led.unload("a") is True
    await load
    assert led.used_mb() == 0
    assert await led.unload("a") is False
    led.check()


async def test_close_unloads_everything() -> None:
    loader = FakeLoader()
    led = ledger({"a": 100, "b": 100}, 1000, loader=loader)
    await led.ensure_loaded("a")
    loader.delay, loader.started = 1.0, threading.Event()
    pending = asyncio.create_task(led.ensure_loaded("b"))
    assert await asyncio.to_thread(loader.started.wait, 10.0), "b's load never began"
    await led.close()  # while b loads
    with pytest.raises(BaseException):  # noqa: B017 - cancelled or refused, either is fine
        await pending
    assert led.used_mb() == 0
    assert online(led) == set()
    led.check()


@pytest.mark.parametrize("on_full", ["evict", "refuse"])
async def test_totals_hold_under_random_concurrent_traffic(on_full: OnFull) -> None:
    """Tasks load, use, unload and reap at random; the invariant holds after every step."""
    sizes: dict[str, int | None] = {f"m{i}": 200 * (i + 1) for i in range(6)}
    sizes["bad"] = 300
    loader = FakeLoader(delay=0.002, broken=["bad"])
    led = ledger(sizes, 2000, on_full=on_full, loader=loader, clock=time.monotonic, idle=0.05)
    names = list(sizes)
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def checker() -> None:
        while not stop.is_set():
            led.check()
            await asyncio.sleep(0)

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            name = rng.choice(names)
            op = rng.choice(["use", "use", "load", "unload", "reap"])
            try:
                if op == "use":
                    async with led.use(name) as handle:
                        led.check()
                        assert led.entry(name).state is ModelState.ONLINE
                        await led.run_in_executor(handle.generate, "x", 1, 0.0, 1.0, [], None)
                elif op == "load":
                    await led.ensure_loaded(name)
                elif op == "unload":
                    await led.unload(name)
                else:
                    led.unload_idle()
                outcomes[op] += 1
            except (InsufficientVram, ModelBusy, ModelLoadFailed) as exc:
                outcomes[type(exc).__name__] += 1
            led.check()
            assert led.used_mb() <= led.budget_mb
            await asyncio.sleep(rng.random() * 0.003)

    check_task = asyncio.create_task(checker())
    await asyncio.gather(*(worker(i) for i in range(24)))
    stop.set()
    await check_task
    led.check()
    assert outcomes["use"] > 0
    assert outcomes["ModelLoadFailed"] > 0
    if on_full == "refuse":
        assert outcomes["InsufficientVram"] > 0
    else:
        assert led.stats.evictions > 0
    await led.close()
    assert led.used_mb() == 0
    led.check()
