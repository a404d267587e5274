"""A causal language model from a local directory, through transformers and torch.

Optional: torch and transformers are imported when the first hf model loads, so backends
that only serve n-gram models start in a fraction of a second without them. Nothing is
ever downloaded (``local_files_only``). On CUDA the handle reports the device memory the
load took, which the ledger charges instead of the configured estimate.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Sequence
from typing import Any

from backends.loaders import LoadError
from backends.registry import ModelSpec

_MB = 1024 * 1024


class HFHandle:
    """A loaded transformers model and its tokenizer; one generation at a time."""

    def __init__(self, model: Any, tokenizer: Any, torch: Any, device: str,
                 measured_mb: int | None, context_length: int) -> None:
        self._model: Any = model
        self._tokenizer = tokenizer
        self._torch = torch
        self._device = device
        self._measured = measured_mb
        self._context_length = context_length
        # torch's global RNG is what ``generate`` samples from: seeding must not interleave.
        self._lock = threading.Lock()

    @property
    def measured_vram_mb(self) -> int | None:
        """CUDA memory the load allocated, or None on the CPU."""
        return self._measured

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
        seed: int | None,
    ) -> tuple[str, int]:
        """Sample (or decode greedily when ``temperature <= 0``) and cut at the first stop."""
        if self._model is None:
            raise RuntimeError("model has been unloaded")
        torch = self._torch
        enc = self._tokenizer(prompt or self._tokenizer.eos_token or " ", return_tensors="pt")
        input_ids = enc["input_ids"][:, -max(1, self._context_length - max_tokens) :]
        budget = max(0, min(max_tokens, self._context_length - input_ids.shape[1]))
        if budget == 0:
            return "", 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": budget,
            "pad_token_id": self._tokenizer.pad_token_id or 0,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False)
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = self._model.generate(
                input_ids=input_ids.to(self._device),
                attention_mask=torch.ones_like(input_ids).to(self._device),
                **kwargs,
            )
        new = out[0, input_ids.shape[1] :]
        text = str(self._tokenizer.decode(new, skip_special_tokens=True))
        cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
        if cuts:
            text = text[: min(cuts)]
        return text, int(new.shape[0])

    def unload(self) -> None:
        """Drop the model and return cached CUDA memory to the driver."""
        self._model = None
        gc.collect()
        if self._device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def load(spec: ModelSpec) -> HFHandle:
    """The ``hf`` loader: ``AutoModelForCausalLM`` + ``AutoTokenizer`` from ``spec.path``."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise LoadError(f"the hf loader needs torch and transformers: {exc}") from exc
    cuda = bool(torch.cuda.is_available())
    device = "cuda:0" if cuda else "cpu"
    before = torch.cuda.memory_allocated(0) if cuda else 0
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(spec.path, local_files_only=True)
        model: Any = AutoModelForCausalLM.from_pretrained(spec.path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot load hf model from {spec.path}: {exc}") from exc
    model.to(device)
    model.eval()
    measured = (torch.cuda.memory_allocated(0) - before + _MB - 1) // _MB if cuda else None
    return HFHandle(model, tokenizer, torch, device, measured, spec.context_length)
