"""The minift spec: the methods' invariants as Hypothesis properties that any implementation can run.

Implement the operations of ``minift.spec.interface.Implementation`` in a module that exposes an
``implementation`` object, then run

    pytest --pyargs minift.spec --impl mypackage.adapter

Each property that fails prints Hypothesis' shrunk counterexample. minift itself is the built-in
implementation (``minift.spec.minift_impl``); ``minift spec export DIR`` writes the same cases as
language-agnostic test vectors. Tutorial: tutorials/12_checking_your_implementation.py.
"""

from minift.spec.interface import Implementation
from minift.spec.properties import PROPERTIES

__all__ = ["PROPERTIES", "Implementation"]
