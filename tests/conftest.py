import os

import torch

# Triton kernels run on a CPU only in Triton's interpreter, and Triton reads TRITON_INTERPRET when
# it is first imported (its own tl.* helpers are @jit functions decorated at import). The engine
# imports the kernels, so the variable must be set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
