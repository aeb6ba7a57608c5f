"""Hypothesis settings for the spec: the ``spec`` profile (no deadline, since other implementations may
be slow to start), or the profile HYPOTHESIS_PROFILE names where this process has registered it (a
name that only the caller's own test suite registers, e.g. minift's ``dev``, falls back to ``spec``
rather than to Hypothesis' defaults, whose 200 ms deadline would fail slow implementations at random)."""

import os

from hypothesis import settings
from hypothesis.errors import InvalidArgument

settings.register_profile("spec", max_examples=25, deadline=None, print_blob=True)
try:
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "spec"))
except InvalidArgument:
    settings.load_profile("spec")
