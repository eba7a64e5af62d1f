"""Hypothesis without per-example deadlines: the properties are about results, and on a
shared 2-core machine an example's wall time says nothing about the code."""

from hypothesis import settings

settings.register_profile("flashtrain", deadline=None)
settings.load_profile("flashtrain")
