"""Start the shim and fake backends as real processes on free loopback ports.

``start_fake`` runs tests/fakes.py; ``start_shim`` writes a JSON config (the shim reads
JSON as well as TOML) pointing at the given backends and waits until the shim's health
socket answers. Both return objects with ``.stop()`` and ``.kill()``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from tests.procs import Backend, Proc, free_port, req, start_backend

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Fake(Backend):
    """A fake backend (tests/fakes.py): a Backend of dialect ``kind`` whose replies carry
    its ``name``."""

    name: str = ""

    @property
    def dialect(self) -> str:
        return self.kind

    def kill(self) -> None:
        self.proc.kill()


def start_fake(name: str, dialect: str = "mma", mode: str = "ok", *, delay_ms: int = 0,
               port: int | None = None, health_port: int | None = None,
               loaded: str | None = None, rename: str = "", pad_bytes: int = 0) -> Fake:
    """Run tests/fakes.py (see its options) and wait until its health socket answers."""
    port = port or free_port()
    health_port = health_port or free_port()
    argv = [sys.executable, "-m", "tests.fakes", "--name", name, "--dialect", dialect,
            "--port", str(port), "--health-port", str(health_port), "--mode", mode,
            "--delay-ms", str(delay_ms)]
    if loaded is not None:
        argv += ["--loaded", loaded]
    if rename:
        argv += ["--rename", rename]
    if pad_bytes:
        argv += ["--pad-bytes", str(pad_bytes)]
    fake = Fake(dialect, Proc(argv, cwd=ROOT), port, health_port, name=name)
    req(fake.health_endpoint, b"ping", timeout=10.0)
    return fake


@dataclass
class ShimProc:
    """A running ``mmshim run`` and its endpoints."""

    proc: Proc
    config_path: Path
    port: int
    health_port: int
    metrics_port: int
    admin_port: int

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def health_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.health_port}"

    @property
    def admin_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.admin_port}"

    def health(self) -> dict[str, Any]:
        return req(self.health_endpoint, b"?", timeout=5.0)

    def status(self) -> dict[str, Any]:
        """The admin ``status`` reply (backends, weights, health details and VRAM: what
        the health socket tells only when ``shim.health_details`` is on)."""
        from shim.ctl import AdminClient

        section = json.loads(self.config_path.read_text())["shim"]
        token_file = section.get("admin_token_file") or str(
            Path(section["state_file"]).with_suffix(".token"))
        client = AdminClient(self.admin_endpoint, Path(token_file).read_text().strip(),
                             timeout_s=5.0)
        try:
            return client.call("status")
        finally:
            client.close()

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=5) as resp:
            return str(resp.read().decode())

    def stop(self) -> int:
        return self.proc.stop(timeout=10.0)

    def kill(self) -> None:
        self.proc.kill()


def shim_config(backends: dict[str, Any], tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A config dict for ``backends`` ({name: Fake or Backend-like or dict}) on free ports."""
    cfg: dict[str, Any] = {
        "shim": {"listen": f"tcp://127.0.0.1:{free_port()}",
                 "health": f"tcp://127.0.0.1:{free_port()}",
                 "metrics": f"127.0.0.1:{free_port()}",
                 "admin": f"tcp://127.0.0.1:{free_port()}",
                 "state_file": str(tmp_path / "state.json")},
        "backends": {},
        "health": {"interval_ms": 200, "timeout_ms": 200},
        "policy": {"fast": "phi-2", "quality": "mistral-7b", "fallback": "tinyllama",
                   "stt": "whisper-small", "tts": "piper-tts"},
        "shadow": {"diff_log": str(tmp_path / "diffs.jsonl")},
        # Fake backends keep no models; tests of ownership turn it on with real backends.
        "ownership": {"enabled": False, "poll_interval_ms": 300},
    }
    for name, b in backends.items():
        if isinstance(b, dict):
            cfg["backends"][name] = b
        else:
            cfg["backends"][name] = {"dialect": b.kind, "endpoints": [b.endpoint],
                                     "health": b.health_endpoint}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def start_shim(cfg: dict[str, Any], tmp_path: Path, *, extra_args: tuple[str, ...] = (),
               env: dict[str, str] | None = None, wait: bool = True,
               path: Path | None = None) -> ShimProc:
    """Run ``mmshim run`` on ``cfg`` and wait for its health socket.

    A port that ``free_port`` handed out can be taken by another process before the shim
    binds it; the shim then exits naming the endpoint, and we retry on fresh ports.
    """
    for attempt in range(3):
        path = path or tmp_path / f"shim-{free_port()}.json"
        path.write_text(json.dumps(cfg))
        proc = Proc([sys.executable, "-m", "shim.cli", "run", "--config", str(path),
                     "--log-level", "warning", *extra_args], cwd=ROOT, env=env)
        s = cfg["shim"]
        shim = ShimProc(proc, path, int(s["listen"].rsplit(":", 1)[1]),
                        int(s["health"].rsplit(":", 1)[1]), int(s["metrics"].rsplit(":", 1)[1]),
                        int(s["admin"].rsplit(":", 1)[1]))
        if not wait:
            return shim
        try:
            req(shim.health_endpoint, b"?", timeout=20.0)
            return shim
        except Exception as exc:
            shim.kill()
            log = proc.log()
            if "in use" in log and attempt < 2:
                for key in ("listen", "health", "admin"):
                    s[key] = f"tcp://127.0.0.1:{free_port()}"
                s["metrics"] = f"127.0.0.1:{free_port()}"
                continue
            raise RuntimeError(f"shim did not start: {exc}\n{log}") from None
    raise AssertionError("unreachable")


def start_reference_stack(tmp_path: Path, token: str, *, mma_args: tuple[str, ...] = (),
                          mms_args: tuple[str, ...] = (), models_file: bool = False,
                          **sections: Any) -> tuple[Backend, Backend, ShimProc]:
    """The two reference backends (tests/procs.start_backend) behind a shim at weights
    mma=100/mms=0 with ownership on (poll 300 ms, hand-over timeout 3 s), its admin token
    ``token`` (``MMSHIM_TOKEN``). ``sections`` are merged into the config (shim_config);
    ``models_file``: the shim reads config/models.toml too. The caller stops all three;
    if the shim does not start, the backends are stopped here."""
    mma = start_backend("mma", extra_args=mma_args)
    try:
        mms = start_backend("mms", extra_args=mms_args)
    except BaseException:
        mma.stop()
        raise
    try:
        sections = {"routing": {"weights": {"mma": 100, "mms": 0}},
                    **sections,
                    "ownership": {"enabled": True, "poll_interval_ms": 300,
                                  "handover_timeout_ms": 3000, **sections.get("ownership", {})}}
        cfg = shim_config({"mma": mma, "mms": mms}, tmp_path, **sections)
        if models_file:
            cfg["models_file"] = str(ROOT / "config" / "models.toml")
        shim = start_shim(cfg, tmp_path, env={"MMSHIM_TOKEN": token})
    except BaseException:
        mma.stop()
        mms.stop()
        raise
    return mma, mms, shim


def dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock
