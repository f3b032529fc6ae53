import pytest


@pytest.fixture(scope="session")
def megatron_tp1():
    """megatron-core initialised in this pytest process at TP=PP=DP=1 (CPU shims on CPU)."""
    from megatron_espace import runtime

    runtime.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    yield
    runtime.destroy()


@pytest.fixture(scope="session")
def hf_cases(tmp_path_factory, megatron_tp1):
    """Tiny HuggingFace models (transformers), their reference logits and their imports."""
    from tests import hf_models

    return hf_models.build(tmp_path_factory.mktemp("hf"))
