"""Re-exports ``common.follower`` for ``worker/cli_errors.py`` and ``worker/analytics/cli.py``,
which still import it from here.

The follower lives in ``common.follower`` (shared by the node and the worker); new code
imports it from there. Delete this module once those two do too (issue 12, item 3).
"""

from common.follower import TopicFollower, TopicUnavailable, valid_records

__all__ = ["TopicFollower", "TopicUnavailable", "valid_records"]
