"""``zoo bench``: ratios measured side by side in one run, written to docs/ with the machine.
One module per suite; ``bench.run.run_bench`` runs one (or all). Not in the wheel: it runs from a
checkout. This file imports nothing, so the load generator (``bench.loadgen``, a process of its own
next to a server under test) does not load torch with the suites."""
