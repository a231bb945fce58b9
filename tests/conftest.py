import os

# Under pytest-xdist (README's test command: -n auto) the workers share the cores: each, and each
# process it starts, takes one thread. Two processes with torch threads on every core make each
# other collapse (DESIGN.md section 8), so the variable is set before torch is imported.
XDIST = "PYTEST_XDIST_WORKER" in os.environ
if XDIST:
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

if XDIST:
    torch.set_num_threads(1)

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


@pytest.fixture
def eager_random_compile(monkeypatch):
    """Compiled graphs that draw eager's random numbers (inductor uses its own generator
    otherwise), for comparisons of a compiled update with the eager one. Dynamo's caches are
    cleared before and after: a graph another test compiled for the same function and shapes,
    without this setting, would pass its guards and be reused, drawing other numbers (the
    compiled tiny run of test_evaluate did that to both comparisons below it)."""
    import torch._dynamo
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
