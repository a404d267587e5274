"""The state file: what it stores, that it round-trips, and that a write is atomic."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.config import ActionRule, decode_config
from shim.errors import StateError
from shim.runtime import Runtime, runtime_from_config
from shim.state import (
    RuntimeState,
    ShadowOverride,
    StateFile,
    apply,
    atomic_write,
    decode_state,
    diff,
    encode_state,
    rebase,
)

BACKENDS = ["mma", "mms"]


def base() -> Runtime:
    cfg = decode_config({
        "backends": {"mma": {"dialect": "mma", "endpoints": ["tcp://127.0.0.1:5580"]},
                     "mms": {"dialect": "mms", "endpoints": ["tcp://127.0.0.1:7211"]}},
        "actions": {"load": {"failover": False}},
        "policy": {"fast": "phi-2"},
    })
    return runtime_from_config(cfg)


def roundtrip(rt: Runtime) -> Runtime:
    """Runtime -> state -> bytes -> state -> Runtime, as a restart does."""
    data = encode_state(diff(base(), rt))
    return apply(base(), decode_state(data), BACKENDS, 4500)


def test_an_unchanged_runtime_has_an_empty_state() -> None:
    state = diff(base(), base())
    assert state.is_empty() and state.summary() == []
    assert json.loads(encode_state(state)) == {"version": 1}


def test_only_what_differs_is_stored_and_restored() -> None:
    rt = (base().with_weights({"mma": 30.0, "mms": 70.0}).with_mode("shadow")
          .with_shadow(percent=25.0)
          .with_action("generate", ActionRule(timeout_ms=3000, mirror="always"), 4500))
    state = diff(base(), rt)
    assert state.summary() == ["mode", "weights", "shadow.percent", "actions.generate"]
    stored = json.loads(encode_state(state))
    assert stored["weights"] == {"mma": 30.0, "mms": 70.0}
    assert stored["shadow"] == {"percent": 25.0}  # sticky etc. stay as configured
    assert "load" not in stored["actions"]  # the config's own rule is not copied
    assert roundtrip(rt).describe() == rt.describe()


@settings(max_examples=60, deadline=None)
@given(mma=st.integers(0, 100),
       mode=st.sampled_from(["split", "shadow"]), percent=st.floats(0, 100),
       sticky=st.booleans(), timeout=st.one_of(st.none(), st.integers(1, 10_000)),
       mirror=st.sampled_from([None, "always", "if_loaded", "never"]))
def test_any_runtime_survives_a_restart(mma: int, mode: str, percent: float,
                                        sticky: bool, timeout: int | None,
                                        mirror: str | None) -> None:
    mms = 100 - mma  # weights are percentages
    rt = (base().with_weights({"mma": float(mma), "mms": float(mms)})
          .with_mode(mode)  # type: ignore[arg-type]
          .with_shadow(percent=percent, sticky=sticky)
          .with_action("status", ActionRule(timeout_ms=timeout, mirror=mirror),  # type: ignore[arg-type]
                       4500))
    assert roundtrip(rt).describe() == rt.describe()


def test_rebase_drops_overrides_of_what_the_file_changed() -> None:
    old = base()
    new = old.with_mode("shadow").with_shadow(sticky=False)  # the file's edit
    current = old.with_weights({"mma": 10.0, "mms": 90.0}).with_mode("split") \
        .with_shadow(sticky=True, percent=5.0)
    kept = rebase(diff(old, current), old, new)
    # Weights and percent were not touched by the file: the operator's values stay.
    assert kept.weights == {"mma": 10.0, "mms": 90.0}
    assert kept.shadow == ShadowOverride(percent=5.0)
    assert kept.mode is None


@pytest.mark.parametrize("state, message", [
    (RuntimeState(weights={"mma": 0.0, "mms": 0.0}), "must not all be zero"),
    (RuntimeState(weights={"mmx": 10.0}), "unknown backend"),
    (RuntimeState(weights={"mma": 101.0}), "within 0..100"),
    (RuntimeState(shadow=ShadowOverride(percent=120.0)), "shadow.percent"),
    (RuntimeState(actions={"nope": ActionRule()}), "unknown action"),
    (RuntimeState(actions={"generate": ActionRule(pin="mmx")}), "unknown backend"),
    (RuntimeState(actions={"load": ActionRule(mirror="always")}), "never mirrored"),
])
def test_a_state_that_does_not_fit_the_config_is_refused(state: RuntimeState,
                                                         message: str) -> None:
    with pytest.raises(StateError, match=message):
        apply(base(), state, BACKENDS, 4500)


@pytest.mark.parametrize("data", [b"{not json", b'{"version": 2}', b'{"version": 1, "x": 1}',
                                  b'{"version": 1, "mode": "sideways"}', b"[]"])
def test_a_damaged_state_file_is_an_error_not_a_crash(data: bytes) -> None:
    with pytest.raises(StateError):
        decode_state(data)


def test_load_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "nope.json").load() is None


def test_atomic_write_replaces_the_file_and_syncs(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "sub" / "state.json"
    atomic_write(path, b"one")
    atomic_write(path, b"two", mode=0o600)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(synced) == 4  # the file and its directory, each time
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_a_failed_write_leaves_the_old_file_and_no_litter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


async def test_saves_coalesce_and_the_last_state_wins(tmp_path: Path) -> None:
    file = StateFile(tmp_path / "state.json")
    writes: list[RuntimeState] = []
    real_write = file.write

    def counting_write(state: RuntimeState) -> None:
        writes.append(state)
        real_write(state)

    file.write = counting_write  # type: ignore[method-assign]
    states = [RuntimeState(weights={"mma": float(i), "mms": 100.0 - i}) for i in range(50)]
    await asyncio.gather(*(file.save(s) for s in states))
    assert len(writes) < 50  # a burst costs a few writes...
    saved = file.load()
    assert saved is not None and saved.weights == {"mma": 49.0, "mms": 51.0}  # ...the last
    assert saved.saved_at > 0


async def test_a_failed_save_is_reported_to_its_caller(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    file = StateFile(blocker / "state.json")  # a directory that cannot exist
    with pytest.raises(OSError):
        await file.save(RuntimeState(mode="shadow"))
    await file.flush()


def test_the_state_struct_names_bad_fields() -> None:
    with pytest.raises(StateError, match="weights"):
        decode_state(b'{"version": 1, "weights": {"mma": "lots"}}')
    assert msgspec.json.decode(encode_state(RuntimeState(mode="shadow")))["mode"] == "shadow"
