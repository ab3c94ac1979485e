"""Process settings for evaluating specs: torch threads, offline hub access, quiet libraries — scoped, not global.

Why scoped: the pytest plugin is installed into every pytest session of an environment, and notebooks import
this package next to their own work; neither may find its threads, environment, hub mode or warning filters
changed because circuit_tests is installed or imported. So nothing here runs on import. ``EvaluationScope``
applies the settings when a spec is first evaluated (the plugin's first spec item, ``circuit_tests.run``) and
``restore()`` puts back exactly what it changed.

What the settings are for: torch's default thread count makes forwards ~40x slower under other CPU load and
bit-for-bit determinism on CPU needs a fixed count; ``HF_HUB_OFFLINE`` makes an uncached hub checkpoint fail in
milliseconds instead of ~23 s of retries. huggingface_hub reads that variable when it is imported, so when it is
already imported the scope also flips ``huggingface_hub.constants.HF_HUB_OFFLINE`` (and restores it).
``USE_HUB_KERNELS=NO`` (unless set): transformers >= 5.25 "kernelizes" every ``from_pretrained`` model with code
from the hub by default (remote code, another implementation of the numbers, 2 s on a first load here); an explicit
value in the environment is respected.

``configure()`` is the process-wide form for processes that own their runtime (the ``circuit-tests`` CLI,
benchmarks, this project's test suite); inside an active scope it does nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

_configured = False
_ONLINE: bool | None = None       # --circuit-online / run(online=...): overrides the environment for this process
_ACTIVE: "EvaluationScope | None" = None
_QUIET_LOGGERS = ("transformers", "transformer_lens", "huggingface_hub")


def _env_offline() -> bool:
    v = os.environ.get("HF_HUB_OFFLINE")
    if v is None:
        return os.environ.get("CIRCUIT_TESTS_ONLINE") != "1"
    return v.strip().lower() not in ("0", "false", "no", "off", "")


def is_offline() -> bool:
    """Whether hub checkpoints may only come from the local cache: ``--circuit-online`` / ``online=`` when given,
    else ``HF_HUB_OFFLINE`` from the environment, else offline unless ``CIRCUIT_TESTS_ONLINE=1``."""
    return (not _ONLINE) if _ONLINE is not None else _env_offline()


def set_online(online: bool | None) -> None:
    """Record the user's choice (no environment change); ``EvaluationScope`` applies it when evaluating."""
    global _ONLINE
    _ONLINE = online


class EvaluationScope:
    """Threads, hub mode and quiet libraries while specs are evaluated; ``restore()`` undoes every change.

    ``enter()`` is idempotent; it imports torch (the caller is about to evaluate a model anyway).
    """

    def __init__(self, *, threads: int = 1, online: bool | None = None):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.threads, self.online = threads, online
        self.active = False
        self._saved: dict[str, Any] = {}

    def enter(self) -> "EvaluationScope":
        global _ACTIVE
        if self.active:
            return self
        saved = self._saved
        saved["env"] = dict(os.environ)  # whole: libraries imported during the scope set variables too
        saved["online"] = _ONLINE
        if self.online is not None:
            set_online(self.online)
        offline = is_offline()
        os.environ["HF_HUB_OFFLINE"] = "1" if offline else "0"
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ.setdefault("USE_HUB_KERNELS", "NO")
        hc = sys.modules.get("huggingface_hub.constants")
        if hc is not None:  # imported already: the environment variable is not read again
            saved["hf_constant"] = getattr(hc, "HF_HUB_OFFLINE", None)
            hc.HF_HUB_OFFLINE = offline
        saved["loggers"] = {n: logging.getLogger(n).level for n in _QUIET_LOGGERS}
        for n in _QUIET_LOGGERS:
            logging.getLogger(n).setLevel(logging.ERROR)
        saved["warnings"] = list(warnings.filters)
        warnings.filterwarnings("ignore", module="transformer_lens")
        import torch

        saved["threads"] = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.active = True
        _ACTIVE = self
        return self

    def restore(self) -> None:
        """Put back every setting ``enter()`` changed (no-op when it never ran)."""
        global _ACTIVE
        if not self.active:
            return
        saved = self._saved
        env = saved["env"]
        for k in [k for k in os.environ if k not in env]:
            del os.environ[k]
        for k, v in env.items():
            if os.environ.get(k) != v:
                os.environ[k] = v
        set_online(saved["online"])
        hc = sys.modules.get("huggingface_hub.constants")
        if hc is not None:  # imported before (restore its value) or during the scope (the value the env now gives)
            hc.HF_HUB_OFFLINE = saved["hf_constant"] if "hf_constant" in saved else (
                os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"))
        for n, level in saved["loggers"].items():
            logging.getLogger(n).setLevel(level)
        warnings.filters[:] = saved["warnings"]
        mutated = getattr(warnings, "_filters_mutated", None)  # invalidates the per-module "already warned" caches
        if mutated is not None:
            mutated()
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(saved["threads"])
        self.active = False
        self._saved = {}
        if _ACTIVE is self:
            _ACTIVE = None

    def __enter__(self) -> "EvaluationScope":
        return self.enter()

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def active_scope() -> EvaluationScope | None:
    return _ACTIVE


def configure(*, online: bool | None = None, threads: int = 1, import_torch: bool = True) -> None:
    """Process-wide settings for a process that owns its runtime (CLI, benchmarks, test suites): offline-first hub
    access, quiet progress bars, ``threads`` torch threads. Idempotent; a no-op inside an ``EvaluationScope``.

    ``online``: None keeps an explicit ``HF_HUB_OFFLINE`` from the environment, else offline unless
    ``CIRCUIT_TESTS_ONLINE=1``. True/False forces it (also at runtime, via huggingface_hub.constants).
    """
    global _configured
    if _ACTIVE is not None:
        return
    if online is None:
        if "HF_HUB_OFFLINE" not in os.environ:
            os.environ["HF_HUB_OFFLINE"] = "0" if os.environ.get("CIRCUIT_TESTS_ONLINE") == "1" else "1"
    else:
        os.environ["HF_HUB_OFFLINE"] = "0" if online else "1"
        hc = sys.modules.get("huggingface_hub.constants")
        if hc is not None:  # already imported: flip the live constant too
            hc.HF_HUB_OFFLINE = not online
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # read when torch is imported
    if import_torch and not _configured:
        import torch

        torch.set_num_threads(threads)
        _configured = True


def environment() -> dict[str, str | int | None]:
    """What decides whether two runs agree bit for bit: package versions, CPU kernels, torch threads.

    Package versions come from the installed metadata (no imports); ``cpu_capability`` and ``threads`` only
    when torch is already imported (None otherwise), so calling this never loads torch."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    torch = sys.modules.get("torch")
    scope = _ACTIVE
    return {"python": platform.python_version(), "machine": platform.machine(),
            "torch": torch.__version__ if torch else ver("torch"), "transformers": ver("transformers"),
            "tokenizers": ver("tokenizers"), "transformer_lens": ver("transformer-lens"),
            "cpu_capability": torch.backends.cpu.get_cpu_capability() if torch else None,
            "threads": scope.threads if scope is not None else (torch.get_num_threads() if torch else None)}
