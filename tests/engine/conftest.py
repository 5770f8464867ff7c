from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_fp32():
    """The real SmolLM2-135M-Instruct in float32 (converted once into the local cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from server.engine.model_loader import ensure_default_model

    path = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), path
