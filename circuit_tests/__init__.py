"""circuit_tests: circuit claims about transformer models as pytest tests, checked at each training checkpoint.

Importing this package is cheap (no torch); heavy modules load on first use.
"""

__version__ = "0.1.0"
