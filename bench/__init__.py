"""sdgate's benchmark suite: ``python -m bench`` (or ``make bench``).

Every server it measures (sdgate, and the peers in :mod:`bench.peers`) is started by the suite
itself on a loopback port, with the same built-in ``tiny`` model, and stopped afterwards. Results
are ratios measured in one run, interleaved, because absolute times on a shared machine drift.
"""
