"""OpenAI request bodies we accept. Every model forbids unknown fields; fields OpenAI or SGLang
define that this server does not implement pass only at the value that means "off" (NEUTRAL_*),
and any other value is rejected by name, never silently ignored."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sglang.srt.sampling.sampling_params import NEUTRAL_SAMPLING


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Strict):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls, replayed as history
    tool_call_id: str | None = None  # a tool turn: the call it answers
    # What other servers put in an assistant turn; not shown to the template (no reasoning parser here).
    refusal: str | None = None
    reasoning_content: str | None = None

    def template_fields(self) -> dict:
        """The message as chat templates read it: a call's arguments as a mapping, not JSON text."""
        out = self.model_dump(include={"role", "content", "name", "tool_call_id"}, exclude_none=True)
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                  "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]  # fmt: skip
        return out


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")  # other JSON-schema fields reach the template as they are

    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


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
    rid: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = None  # SGLang / vLLM extensions from here
    min_tokens: int | None = None


class ChatCompletionRequest(_SamplingFields):
    @property
    def uses_tools(self) -> bool:
        """Tools are rendered into the prompt and calls read back from the answer."""
        return bool(self.tools) and self.tool_choice != "none"

    messages: list[ChatMessage] = Field(default_factory=list)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict | None = None  # SGLang / vLLM: extra variables for the chat template
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | None = None  # "required" and named choices are not supported
    separate_reasoning: bool = True  # SGLang's: with --reasoning-parser, thinking goes to reasoning_content


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False


# Neutral values per field (None always passes). Benchmark clients send several of these on every
# request: SGLang's and vLLM's completions clients `best_of: 1`, chat SDKs `tools: []`.
_NEUTRAL_SAMPLING = {
    **{name: NEUTRAL_SAMPLING[name] for name in ("regex", "json_schema", "ebnf")},
    "best_of": (1,), "lora_path": (), "return_hidden_states": (False,),
}  # fmt: skip
NEUTRAL_CHAT_FIELDS = {
    **_NEUTRAL_SAMPLING,
    "functions": ([],), "function_call": ("none", "auto"),
    "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},), "audio": (),
    "modalities": (["text"],), "prediction": (), "reasoning_effort": (), "service_tier": ("auto", "default"),
    "store": (False,), "metadata": ({},), "web_search_options": (), "suffix": (),
    "continue_final_message": (False,),  # a final assistant turn is never continued
}  # fmt: skip
NEUTRAL_COMPLETION_FIELDS = {**_NEUTRAL_SAMPLING, "suffix": ("",)}
