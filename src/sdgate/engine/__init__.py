"""The model side: load a diffusers pipeline and run it on one thread that owns it.

Nothing here is imported by the API or gateway modules unless the local backend is used, so the
gateway installs and starts without torch.
"""

import os

# OpenMP threads that wait for work spin by default. When anything else wants the CPU — the server's
# own event loop, encoding, another process — the spinning threads take it from the one doing the
# work: on two shared cores, a 20-step 64x64 demo image took 20 s with two torch threads instead of
# 0.9 s with passive waiting (and 0.7 s with one thread). Set before torch loads its OpenMP runtime;
# a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
