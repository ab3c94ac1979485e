"""Keys of the plugin's session state, in a module of their own so that ``plugin`` (thin, imported by every pytest
session) and ``collect`` (the items, imported lazily) both use them without importing each other."""

from __future__ import annotations

from typing import Any

import pytest

RECORD_KEY = "circuit_tests_record"       # item and call-report attribute carrying the result record (JSON text)
SCOPE = pytest.StashKey[Any]()            # runtime.EvaluationScope: threads, hub mode, restored at unconfigure
RESULT_CACHE = pytest.StashKey[Any]()     # cache.ResultCache with --circuit-cache / --circuit-cache-dir
COMPARE_RECORDS = pytest.StashKey[Any]()  # the records of --circuit-compare OLD_JSON
