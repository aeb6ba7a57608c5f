"""The minift spec: the methods' invariants as Hypothesis properties that any implementation can run.

Implement the operations of ``minift.spec.interface.Implementation`` in a module that exposes an
``implementation`` object, then run

    pytest --pyargs minift.spec --impl mypackage.adapter

Each property that fails prints Hypothesis' counterexample. minift itself is the built-in
implementation (``minift.spec.minift_impl``); ``minift spec export DIR`` writes the same cases as
language-agnostic test vectors. The properties live in ``minift.spec.properties`` and are imported
only when used: Hypothesis binds a property's settings when it is defined, so the active profile
must be loaded first (and the pytest plugin, imported by every pytest run, stays light).
"""
