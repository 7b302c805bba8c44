"""Re-exports ``common.retry`` for ``worker/app.py``, which still imports it from here.

The helpers live in ``common.retry`` (shared by the node and the worker); new code imports
them from there. Delete this module once ``worker/app.py`` does too (issue 12, item 3).
"""

from common.retry import cancel_and_wait, keep_running, retry_forever, transient_only

__all__ = ["cancel_and_wait", "keep_running", "retry_forever", "transient_only"]
