"""tokenmill: a production LLM serving stack.

`from tokenmill import LLM, SamplingParams`. Imports are lazy so that light
modules (the scheduler, the planner) load without torch.
"""
from __future__ import annotations

import importlib

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "tokenmill.llm",
    "SamplingParams": "tokenmill.engine.request",
    "RequestOutput": "tokenmill.outputs",
    "CompletionOutput": "tokenmill.outputs",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
