import numpy as np
import pytest
import torch

from engine.transfer import ObsUploader


def obs(i: int) -> dict[str, np.ndarray]:
    return {
        "image": np.full((3, 8, 8, 3), i, np.uint8),
        "vector": np.full((3, 4), i / 2, np.float32),
        "is_first": np.array([i % 2 == 0] * 3),
    }


def test_cpu_upload_wraps_the_arrays():
    up = ObsUploader(torch.device("cpu"))
    o = obs(1)
    t = up(o)
    assert t["image"].dtype == torch.uint8 and t["is_first"].dtype == torch.bool
    assert t["vector"].data_ptr() == o["vector"].ctypes.data  # no copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_double_buffered_uploads_keep_every_step():
    up = ObsUploader(torch.device("cuda"))
    outs = [up(obs(i)) for i in range(5)]  # buffers are reused from the third call on
    torch.cuda.synchronize()
    for i, t in enumerate(outs):
        for k, v in obs(i).items():
            assert torch.equal(t[k].cpu(), torch.from_numpy(v)), (i, k)
    assert all(b.is_pinned() for b in up._bufs[0].values())
