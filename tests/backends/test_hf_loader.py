"""The hf loader with a tiny randomly initialised GPT-2 built here (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.procs import Backend, req

pytestmark = pytest.mark.hf

SENTENCES = [
    "the model manager loads a model",
    "the shim sends each request to a backend",
    "a backend answers every request in time",
    "the ledger charges each loaded model",
]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    out = tmp_path_factory.mktemp("tiny-gpt2")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"])
    tok.train_from_iterator(SENTENCES, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    fast.save_pretrained(out)
    config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    return out


def test_hf_handle_in_process(tiny_gpt2: Path) -> None:
    from backends.loaders import load_model
    from backends.registry import ModelSpec

    spec = ModelSpec(loader="hf", path=str(tiny_gpt2), estimated_vram_mb=50, context_length=64)
    handle = load_model(spec)
    assert handle.measured_vram_mb is None  # CPU: the estimate is charged
    a = handle.generate("the model", 8, 1.0, 1.0, [], 1)
    assert a == handle.generate("the model", 8, 1.0, 1.0, [], 1)
    assert 1 <= a[1] <= 8
    greedy = handle.generate("the model", 6, 0.0, 1.0, [], None)
    assert greedy == handle.generate("the model", 6, 0.0, 1.0, [], 99)
    texts = {handle.generate("the model", 8, 1.5, 1.0, [], s)[0] for s in range(6)}
    assert len(texts) > 1
    text, _ = a
    if text.split():
        word = text.split()[-1]
        cut, _ = handle.generate("the model", 8, 1.0, 1.0, [word], 1)
        assert word not in cut
    handle.unload()
    with pytest.raises(RuntimeError):
        handle.generate("x", 1, 0.0, 1.0, [], None)


def test_hf_model_through_the_socket(
    tiny_gpt2: Path, models_toml: Callable[..., Path], backend_factory: Callable[..., Backend]
) -> None:
    toml = models_toml(
        {"tiny-gpt2": {"loader": "hf", "path": str(tiny_gpt2), "estimated_vram_mb": 50,
                       "context_length": 64}},
        policy={"fast": "tiny-gpt2"},
        budget={"vram_mb": 1000},
    )
    be = backend_factory("mms", toml)
    body = {"action": "generate_text", "model_id": "tiny-gpt2", "prompt": "the shim sends",
            "max_tokens": 6, "temperature": 0.8, "seed": 4}
    first = req(be.endpoint, body, timeout=60)
    assert first["status"] == "success", first
    assert first["model_id"] == "tiny-gpt2"
    assert 1 <= first["tokens_generated"] <= 6
    assert req(be.endpoint, body, timeout=30)["text"] == first["text"]
    health = req(be.endpoint, {"action": "health_check"})
    assert (health["vram_used_mb"], health["vram_budget_mb"]) == (50, 1000)
    assert req(be.endpoint, {"action": "unload_model", "model_id": "tiny-gpt2"})["unloaded"]
