"""Turn a model directory (HF format) or an in-memory HF module into an evaluated TransformerBridge.

Why one place: every route must end in the same state (eval mode, CPU, float32, no compatibility
processing) so that numbers from zoo models, local directories and hub checkpoints are comparable,
and weights are hashed the same way everywhere (duplicate-checkpoint detection).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

import torch  # noqa: E402  (no process settings here: runtime.EvaluationScope)

__all__ = ["load_bridge", "bridge_from_hf", "weights_sha256", "state_dict_sha256", "load_tokenizer"]


def _quiet() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformer_lens")


def load_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer saved with a model directory; a directory without one is an error (never a silent empty vocab)."""
    d = Path(model_dir)
    if not any((d / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise ModelLoadError(f"{d}: no tokenizer files (tokenizer.json / vocab.json) in the model directory; "
                             "save the tokenizer next to the weights (tokenizer.save_pretrained(dir))")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def load_bridge(model_dir: str | Path, *, device: str = "cpu") -> Any:
    """Boot a TransformerBridge from a local HF-format directory (config.json + weights + tokenizer).

    The config is checked against the weight files' headers first (``integrity.check_config_fits_weights``):
    transformers builds the config's model at full size before it compares shapes, so a config that is not these
    weights' model (a bare ``{"model_type": "gpt_neox"}``: 20B parameters) would take tens of GB to be refused.
    """
    d = Path(model_dir)
    if not (d / "config.json").exists():
        raise ModelLoadError(f"{d}: not an HF model directory (no config.json)")
    from .integrity import check_config_fits_weights

    check_config_fits_weights(d)
    _quiet()
    from transformer_lens.model_bridge import TransformerBridge

    try:  # garbage config.json / tokenizer files: the libraries raise OSError/ValueError/KeyError with long traces
        tok = load_tokenizer(d)
        bridge = TransformerBridge.boot_transformers(str(d), tokenizer=tok, device=device)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{d}: could not load the model: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return bridge.eval()


def bridge_from_hf(hf_model: Any, tokenizer: Any = None) -> Any:
    """Wrap an in-memory HF causal LM (e.g. random-init from a real config) as a bridge, in eval mode."""
    _quiet()
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    arch = type(hf_model).__name__
    bridge = build_bridge_from_module(hf_model.eval(), arch, hf_config=hf_model.config, tokenizer=tokenizer)
    return bridge.eval()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order: same weights, same hash."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_sha256(model_dir: str | Path) -> str:
    """Hash of the weights stored in a model directory (safetensors files, or a bin loaded weights-only)."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            try:  # truncated, bit-flipped header, or not safetensors at all (e.g. a pickle under that name)
                state.update(load_file(str(f)))
            except Exception as e:
                raise ModelLoadError(f"{f}: unreadable safetensors file: {type(e).__name__}: {_first_line(e)}") from None
    else:
        bins = sorted(d.glob("pytorch_model*.bin"))
        if not bins:
            raise ModelLoadError(f"{d}: no weights (*.safetensors or pytorch_model*.bin)")
        for f in bins:
            try:  # weights_only: a pickle that would run code is refused, and reported as such
                with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing it
                    warnings.simplefilter("ignore")
                    state.update(torch.load(str(f), map_location="cpu", weights_only=True))
            except Exception as e:
                import re

                refused = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
                why = (f"a pickle that is not plain tensors, refused unexecuted ({refused.group(1).strip()})" if refused
                       else f"{type(e).__name__}: {_first_line(e)}")
                raise ModelLoadError(f"{f}: not loadable as weights (torch.load weights_only=True): {why}") from None
    return state_dict_sha256(state)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""
