"""OpenAI request bodies we accept. Every model forbids unknown fields, and fields OpenAI defines but
this server does not implement are rejected by name (see UNSUPPORTED_*), never silently ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _SamplingFields(_Strict):
    """Sampling fields shared by chat and completions (SGLang's extra fields included)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at their neutral value; anything else is rejected by the handler.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    rid: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


# OpenAI fields we know and do not implement: a request using them gets a 400 naming the field.
UNSUPPORTED_CHAT_FIELDS = {
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format",
    "logit_bias", "audio", "modalities", "prediction", "reasoning_effort", "service_tier", "store",
    "metadata", "web_search_options", "best_of", "suffix",
}
UNSUPPORTED_COMPLETION_FIELDS = {"suffix", "best_of", "logit_bias"}
