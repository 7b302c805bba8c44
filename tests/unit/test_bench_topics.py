"""A benchmark run gets its own copy of every topic the worker uses."""

from __future__ import annotations

from bench.common import WORKER_TOPICS, run_topics
from worker.settings import Settings


def test_every_topic_setting_of_the_worker_is_replaced_per_run() -> None:
    """A topic the list misses is shared by every run on the broker and read again by the next
    run's worker from its start (how the allowances topic inflated bench.decisions)."""
    topic_settings = {name for name in Settings.model_fields if name.endswith("_topic")}
    assert set(run_topics("bench.x")) == topic_settings
    assert len(WORKER_TOPICS) == len(topic_settings)


def test_run_topics_are_named_after_the_run() -> None:
    topics = run_topics("bench.dec.ab12")
    assert topics["allowances_topic"] == "bench.dec.ab12.allowances"
    assert len(set(topics.values())) == len(topics)
