"""The n-gram loader: deterministic files, real decoding, and parameters that matter."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from backends import build_models
from backends.loaders import LoadError, load_model
from backends.loaders.ngram import BOUNDARY, NGramModel, detokenize, read_model, tokenize
from backends.registry import ModelSpec
from tests.procs import MODELS_DIR

PROMPT = "Return the socket"


@pytest.fixture(scope="module")
def tiny() -> NGramModel:
    return read_model(MODELS_DIR / "tiny.ngram")


def corpus() -> list[list[str]]:
    text = [
        "the cat sat on the mat",
        "the dog sat on the log",
        "a cat and a dog sat together on the mat",
    ]
    return [[*tokenize(t), BOUNDARY] for t in text]


def test_build_is_deterministic_and_round_trips() -> None:
    first = NGramModel.build("t", corpus(), 3).to_bytes()
    second = NGramModel.build("t", corpus(), 3).to_bytes()
    assert first == second
    model = NGramModel.from_bytes(first)
    assert model.order == 3
    assert model.vocab[0] == BOUNDARY
    header, _ = NGramModel.read_header(first)
    assert header.tables[0].order == 2
    assert header.training_tokens == model.training_tokens
    # Trigram "sat on" is always followed by "the": greedy decoding must say so.
    assert model.generate("the dog sat on", 1, 0.0, 1.0, [], None) == ("the", 1)


def test_builder_walks_stdlib_deterministically() -> None:
    json_pkg = Path(sysconfig.get_paths()["stdlib"]) / "json"
    files = build_models.collect(jobs=1, root=json_pkg)
    assert files == build_models.collect(jobs=1, root=json_pkg)
    recipe = build_models.RECIPES[0]
    docs = build_models.documents(files, recipe)
    assert docs, "json package has docstrings"
    blobs = {NGramModel.build("j", docs, recipe.order).to_bytes() for _ in range(2)}
    assert len(blobs) == 1


def test_default_model_files(tiny: NGramModel) -> None:
    base_size = (MODELS_DIR / "base.ngram").stat().st_size
    tiny_size = (MODELS_DIR / "tiny.ngram").stat().st_size
    assert 2_000_000 < tiny_size < 10_000_000
    assert base_size > 5 * tiny_size
    header, _ = NGramModel.read_header((MODELS_DIR / "base.ngram").read_bytes()[:4096])
    assert (tiny.order, header.order) == (3, 4)


def test_same_seed_same_text(tiny: NGramModel) -> None:
    a = tiny.generate(PROMPT, 40, 0.8, 0.95, [], 7)
    b = tiny.generate(PROMPT, 40, 0.8, 0.95, [], 7)
    assert a == b
    assert a[1] == 40


def test_seed_changes_sampled_text(tiny: NGramModel) -> None:
    texts = {tiny.generate(PROMPT, 40, 1.0, 1.0, [], seed)[0] for seed in range(5)}
    assert len(texts) == 5


def test_greedy_ignores_seed(tiny: NGramModel) -> None:
    texts = {tiny.generate(PROMPT, 30, 0.0, 1.0, [], seed)[0] for seed in range(4)}
    assert len(texts) == 1


def test_temperature_changes_text(tiny: NGramModel) -> None:
    texts = {tiny.generate(PROMPT, 40, t, 1.0, [], 3)[0] for t in (0.0, 0.5, 1.0, 2.0)}
    assert len(texts) == 4


def test_top_p_changes_text(tiny: NGramModel) -> None:
    greedy = tiny.generate(PROMPT, 40, 0.0, 1.0, [], None)[0]
    # A nucleus smaller than the top token's share keeps only that token: greedy.
    assert tiny.generate(PROMPT, 40, 1.5, 1e-6, [], 11)[0] == greedy
    texts = {tiny.generate(PROMPT, 40, 1.5, p, [], 11)[0] for p in (1e-6, 0.5, 1.0)}
    assert len(texts) == 3


def test_max_tokens_bounds_output(tiny: NGramModel) -> None:
    short, n_short = tiny.generate(PROMPT, 5, 0.7, 0.95, [], 1)
    long, n_long = tiny.generate(PROMPT, 50, 0.7, 0.95, [], 1)
    assert (n_short, n_long) == (5, 50)
    assert long.startswith(short)
    assert len(long) > len(short)
    assert tiny.generate(PROMPT, 0, 0.7, 0.95, [], 1) == ("", 0)


def test_stop_truncates(tiny: NGramModel) -> None:
    full, n_full = tiny.generate(PROMPT, 60, 0.7, 0.95, [], 2)
    words = full.split()
    stop = words[len(words) // 2]
    cut, n_cut = tiny.generate(PROMPT, 60, 0.7, 0.95, [stop, "never-appears"], 2)
    assert cut == full[: full.index(stop)].lstrip(" ")
    assert stop not in cut
    assert n_cut < n_full


def test_prompt_conditions_continuation(tiny: NGramModel) -> None:
    a = tiny.generate("Return the", 10, 0.0, 1.0, [], None)[0]
    b = tiny.generate("Raise an", 10, 0.0, 1.0, [], None)[0]
    c = tiny.generate("unknownword zzqx Return the", 10, 0.0, 1.0, [], None)[0]
    assert a != b
    assert a == c  # unknown words are skipped; the last known words decide


def test_cancelled_generation_ends_early(tiny: NGramModel) -> None:
    calls: list[int] = []

    def cancelled() -> bool:
        calls.append(1)
        return len(calls) > 2

    _, n = tiny.generate(PROMPT, 1000, 0.7, 0.95, [], 1, cancelled=cancelled)
    assert n == 32  # polled every 16 tokens: stops at the third poll
    assert tiny.generate(PROMPT, 1000, 0.7, 0.95, [], 1, cancelled=lambda: True) == ("", 0)


def test_detokenize() -> None:
    assert detokenize(["Hello", ",", "world", "(", "x", ")", ".", BOUNDARY, "Next"]) == (
        "Hello, world (x).\nNext"
    )


def test_loader_interface_and_unload() -> None:
    spec = ModelSpec(loader="ngram", path=str(MODELS_DIR / "tiny.ngram"),
                     estimated_vram_mb=1, context_length=8)
    handle = load_model(spec)
    assert handle.measured_vram_mb is None
    text, n = handle.generate(PROMPT, 100, 0.7, 0.95, [], 1)
    assert n == 8  # capped at the context length
    assert text
    handle.unload()
    with pytest.raises(RuntimeError):
        handle.generate(PROMPT, 1, 0.7, 0.95, [], 1)


def test_corrupt_files_are_refused(tmp_path: Path) -> None:
    data = NGramModel.build("t", corpus(), 3).to_bytes()
    cases = {
        "magic": b"XXXXXXXX" + data[8:],
        "truncated": data[:-10],
        "flipped": data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:],
        "empty": b"",
    }
    for name, blob in cases.items():
        path = tmp_path / f"{name}.ngram"
        path.write_bytes(blob)
        with pytest.raises(LoadError, match=name + ".ngram"):
            read_model(path)
    with pytest.raises(LoadError, match="cannot read"):
        read_model(tmp_path / "missing.ngram")
