"""DreamerV3 training engine.

Importing the package sets OpenMP's wait policy to passive (unless OMP_WAIT_POLICY is already
set): torch's intra-op threads then sleep between parallel regions instead of spinning. A run
spins its idle threads on cores that its env threads, its collector thread and any other run
need. Measured on the 2-core CPU (AVX2 EPYC, 2026-12-03), the d256 learner benchmark (eager,
8 x 25, 2 threads) beside four single-threaded training runs: 20,118.7 ms per update with the
default policy, 8,767.7 ms passive; alone: 2,400.4 / 2,133.0 ms default, 2,434.4 / 2,272.4 ms
passive (two runs each). OpenMP reads the variable once, when torch is first imported: the
command-line entry points (python -m engine.run, ...) import this package first.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
