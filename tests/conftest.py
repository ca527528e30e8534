"""Session fixtures shared by the test folders: the real default model is loaded
once, and transformers' own load of the same GGUF serves as the reference."""
import pytest


@pytest.fixture(scope="session")
def default_model():
    import torch

    from tokenmill.models.loader import load_model
    return load_model(None, dtype=torch.float32)


@pytest.fixture(scope="session")
def hf_default_model():
    import torch
    from transformers import AutoModelForCausalLM

    from tokenmill.models.loader import default_model_path
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_default_tokenizer():
    from transformers import AutoTokenizer

    from tokenmill.models.loader import default_model_path
    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
