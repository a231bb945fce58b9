import os

import torch

# Triton kernels run on a CPU only in Triton's interpreter, and Triton reads TRITON_INTERPRET when
# it is first imported (its own tl.* helpers are @jit functions decorated at import). The engine
# imports the kernels, so the variable must be set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _bf16_on_any_cpu(request, monkeypatch):
    """The bf16 tests check numerics, not speed: let general.precision = bf16 apply on a CPU
    without native bf16 too (engine.fast drops it there for speed). A test marked
    `native_bf16_check` sees the real check."""
    if "native_bf16_check" not in request.keywords:
        from engine import fast

        monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: True)
