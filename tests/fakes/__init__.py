"""Test doubles that speak real protocols: the scripted fake OpenAI upstream."""

from tests.fakes.upstream import FakeUpstream, RecordedRequest

__all__ = ["FakeUpstream", "RecordedRequest"]
