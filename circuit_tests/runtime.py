"""Process-wide settings that must be fixed before torch / transformers are imported.

Why here: ``HF_HUB_OFFLINE`` is read when huggingface_hub is imported (later changes cost ~23 s of retries
per missing model), torch's default 2 threads make forwards 40x slower under any other CPU load, and
bit-for-bit determinism on CPU needs a fixed thread count. Call ``configure()`` first thing.
"""

from __future__ import annotations

import os

_configured = False


def configure(*, online: bool | None = None, threads: int = 1, import_torch: bool = True) -> None:
    """Set offline-first hub access, quiet progress bars and the torch thread count (idempotent).

    ``online``: None keeps an explicit ``HF_HUB_OFFLINE`` from the environment, else offline unless
    ``CIRCUIT_TESTS_ONLINE=1``. True/False forces it (also at runtime, via huggingface_hub.constants).
    ``import_torch=False`` (the pytest plugin) only sets the environment, so ``pytest --help`` stays fast;
    modules that use torch call ``configure()`` again and fix the thread count then.
    """
    global _configured
    if online is None:
        if "HF_HUB_OFFLINE" not in os.environ:
            os.environ["HF_HUB_OFFLINE"] = "0" if os.environ.get("CIRCUIT_TESTS_ONLINE") == "1" else "1"
    else:
        os.environ["HF_HUB_OFFLINE"] = "0" if online else "1"
        try:  # already imported: flip the live constant too
            import sys
            if "huggingface_hub" in sys.modules:
                import huggingface_hub.constants as hc
                hc.HF_HUB_OFFLINE = not online
        except Exception:  # pragma: no cover - best effort
            pass
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # read when torch is imported
    if import_torch and not _configured:
        import torch

        torch.set_num_threads(threads)
        _configured = True


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False", "")


def environment() -> dict[str, str | int | None]:
    """What decides whether two runs agree bit for bit: package versions, CPU kernels, torch threads.

    Package versions come from the installed metadata (no imports); ``cpu_capability`` and ``threads`` only
    when torch is already imported (None otherwise), so calling this never loads torch."""
    import platform
    import sys
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    torch = sys.modules.get("torch")
    return {"python": platform.python_version(), "machine": platform.machine(),
            "torch": torch.__version__ if torch else ver("torch"), "transformers": ver("transformers"),
            "tokenizers": ver("tokenizers"), "transformer_lens": ver("transformer-lens"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability() if torch else None,
            "threads": torch.get_num_threads() if torch else None}
