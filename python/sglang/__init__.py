"""A small SGLang-compatible runtime for Gemma 4."""

__version__ = "0.1.0"


def __getattr__(name):
    # Engine pulls in torch and the model code; import it only when asked for.
    if name == "Engine":
        from sglang.srt.entrypoints.engine import Engine

        return Engine
    raise AttributeError(name)
