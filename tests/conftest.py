import pytest


@pytest.fixture(scope="session")
def megatron_tp1():
    """megatron-core initialised in this pytest process at TP=PP=DP=1 (CPU shims on CPU)."""
    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    yield
    runtime.destroy()
