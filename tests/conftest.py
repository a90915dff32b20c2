"""Suite-wide settings: the models here are tiny, so one intra-op thread is fastest (and keeps two
test processes, or a torchrun pair, from fighting over CI's two cores); offline, always."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the scripts the tests start
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state whose precision cannot change: set bf16 for one test only."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
