"""Threshold notifications: which crossings to notify (``thresholds``, pure, used by the limit
engine), how a webhook is signed (``signature``, pure) and the deliverer that posts the
notifications topic to the configured endpoints (``deliver``, run by ``meter notify`` or inside
the worker)."""
