"""Re-exports ``worker.records`` for ``worker/app.py`` and ``worker/dlq_cli.py``, which still
import it from here.

Validation moved to ``worker.records`` so the limits' fast lane shares it without importing
the ingest package; delete this module once those files import it from there (issue 12).
"""

from worker.records import Rejection, Validator

__all__ = ["Rejection", "Validator"]
