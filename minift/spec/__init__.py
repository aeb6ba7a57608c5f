"""The minift spec: the decoder's definition and the methods' formulas and invariants as Hypothesis
properties that any implementation can run.

Implement the operations of ``minift.spec.interface.Implementation`` in a module that exposes an
``implementation`` object, then run

    pytest --pyargs minift.spec --impl mypackage.adapter

Each property that fails prints Hypothesis' counterexample. minift itself is the built-in
implementation (``minift.spec.minift_impl``); ``minift.spec.reference`` is the plain float64
decoder the logits and loss are compared with; ``minift spec export DIR`` writes self-contained cases
as language-agnostic test vectors with a standalone checker. The properties live in
``minift.spec.properties`` and are imported only when used: Hypothesis binds a property's settings
when it is defined, so the active profile must be loaded first (and the pytest plugin, imported by
every pytest run, stays light).
"""
