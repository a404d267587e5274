"""What a new user meets first: help without markup, ``ctl status`` for people (``--json``
for machines), weights as percentages on the command line, strict config types."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.shimproc import ROOT, Fake, ShimProc, shim_config, start_shim

CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("MMSHIM_TOKEN", "MMSHIM_ADMIN", "MMSHIM_CONFIG")}


def mmshim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim.cli", *args], cwd=ROOT, env=CLEAN_ENV,
                          capture_output=True, text=True, timeout=90)


@pytest.fixture
def running(fakes: dict[str, Fake], tmp_path: Path) -> Iterator[ShimProc]:
    shim = start_shim(shim_config(fakes, tmp_path), tmp_path)
    yield shim
    shim.kill()


@pytest.mark.parametrize("args", [["--help"], ["ctl", "--help"], ["stack", "--help"],
                                  ["ctl", "weights", "--help"]])
def test_help_has_no_markup(args: list[str]) -> None:
    done = mmshim(*args)
    assert done.returncode == 0 and done.stdout.startswith("usage: mmshim")
    assert "``" not in done.stdout and ":func:" not in done.stdout


def test_ctl_status_is_for_people_and_json_for_machines(running: ShimProc) -> None:
    config = str(running.config_path)
    done = mmshim("ctl", "--config", config, "status")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "BACKEND" in text and "mma" in text and "mms" in text
    assert "{" not in text and '"' not in text, text  # no raw JSON left in it
    done = mmshim("ctl", "--config", config, "status", "--json")
    assert json.loads(done.stdout)["weights"] == {"mma": 100.0, "mms": 0.0}


def test_ctl_weights_are_percentages(running: ShimProc) -> None:
    config = str(running.config_path)
    done = mmshim("ctl", "--config", config, "weights", "mms=10")
    assert done.returncode == 0, done.stderr
    assert "weights.mma: 100 -> 90" in done.stdout and "weights.mms: 0 -> 10" in done.stdout
    done = mmshim("ctl", "--config", config, "weights", "mma=60", "mms=50")
    assert done.returncode == 1
    assert "must add up to 100: mma=60, mms=50 adds up to 110" in done.stderr
    status = json.loads(mmshim("ctl", "--config", config, "--json", "status").stdout)
    assert status["weights"] == {"mma": 90.0, "mms": 10.0}  # the refusal changed nothing


def test_check_config_refuses_a_string_where_a_number_goes(tmp_path: Path) -> None:
    text = (ROOT / "config" / "shim.toml").read_text()
    bad = re.sub(r"(?m)^default_timeout_ms = (\d+)", r'default_timeout_ms = "\1"', text)
    assert bad != text
    path = tmp_path / "shim.toml"
    path.write_text(bad)
    (tmp_path / "models.toml").write_text((ROOT / "config" / "models.toml").read_text())
    done = mmshim("check-config", str(path))
    assert done.returncode == 2
    assert "Expected `int`, got `str` - at `$.shim.default_timeout_ms`" in done.stderr
    weights = re.sub(r"(?m)^weights = .*$", "weights = { mma = 100, mms = 50 }", text)
    assert weights != text
    path.write_text(weights)
    done = mmshim("check-config", str(path))
    assert done.returncode == 2 and "must add up to 100" in done.stderr
