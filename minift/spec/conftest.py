"""Hypothesis settings for the spec: the ``spec`` profile (no deadline, since other implementations may
be slow to start) unless HYPOTHESIS_PROFILE names another registered profile."""

import os

from hypothesis import settings

settings.register_profile("spec", max_examples=25, deadline=None, print_blob=True)
if os.environ.get("HYPOTHESIS_PROFILE") in (None, "spec"):
    settings.load_profile("spec")
