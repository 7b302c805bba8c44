"""Consume -> validate -> dedup -> aggregate -> store, with bad input sent to the DLQ."""
