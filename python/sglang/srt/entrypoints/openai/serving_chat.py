"""POST /v1/chat/completions: chat template, n choices, stream (SSE) and non-stream answers."""

from __future__ import annotations

import functools
import json
import re
from typing import AsyncIterator


from sglang.srt.entrypoints.openai.protocol import NEUTRAL_CHAT_FIELDS, ChatCompletionRequest
from sglang.srt.entrypoints.openai.serving_base import (
    MAX_TOP_LOGPROBS,
    SSE_DONE,
    OpenAIError,
    ServingBase,
    StreamAborted,
    chat_logprobs,
    check_common,
    choice_usage,
    abort_error,
    finish_reason_str,
    new_id,
    now,
    sampling_params_dict,
    sse,
    stream_deltas,
    usage,
    usage_options,
)
from sglang.srt.entrypoints.openai.reasoning import ReasoningStream, split_reasoning
from sglang.srt.entrypoints.openai.tool_calls import HeldContent, split_tool_calls
from sglang.srt.managers.io_struct import GenerateReqInput


# apply_chat_template arguments that this handler sets or that would change what it returns, so
# chat_template_kwargs may not.
_TEMPLATE_ARGS_SET_HERE = {
    "conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message", "chat_template",
    "return_dict", "return_tensors", "tools",
}  # fmt: skip


# Tool calls and thinking are marked by special tokens, which the text must keep, unpadded, to be
# read back; the other special tokens are removed from what is shown (_visible).
_KEEP_MARKERS = {"skip_special_tokens": False, "spaces_between_special_tokens": False}


class OpenAIServingChat(ServingBase):
    request_cls = ChatCompletionRequest
    neutral_fields = NEUTRAL_CHAT_FIELDS

    def _build_inputs(self, req: ChatCompletionRequest) -> list[GenerateReqInput]:
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        check_common(req, max_tokens)
        if not req.messages:
            raise OpenAIError("messages must contain at least one message", param="messages")
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise OpenAIError("top_logprobs requires logprobs to be true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise OpenAIError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
        input_ids = self._apply_chat_template(req)
        return [
            GenerateReqInput(
                input_ids=input_ids,
                sampling_params={**sampling_params_dict(req, max_tokens, i), **(_KEEP_MARKERS if self._keeps_markers(req) else {})},
                stream=req.stream,
                return_logprob=req.logprobs,
                top_logprobs_num=req.top_logprobs or 0,
                rid=f"{req.rid}-{i}" if req.rid and req.n > 1 else req.rid,
            )
            for i in range(req.n)
        ]

    def _apply_chat_template(self, req: ChatCompletionRequest) -> list[int]:
        tokenizer = self.tm.tokenizer
        if tokenizer is None:
            raise OpenAIError("chat completions need a tokenizer; this server runs with --skip-tokenizer-init")
        try:
            messages = [m.template_fields() for m in req.messages]
        except json.JSONDecodeError as e:
            raise OpenAIError(f"a tool call's arguments are not valid JSON: {e}", param="messages") from None
        for i, m in enumerate(messages):
            if m.get("content") is None and m["role"] != "assistant":
                raise OpenAIError(f"messages[{i}].content is required for role {m['role']!r}", param=f"messages.{i}.content")
        kwargs = req.chat_template_kwargs or {}
        reserved = sorted(kwargs.keys() & _TEMPLATE_ARGS_SET_HERE)
        if reserved:
            raise OpenAIError(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        try:
            if req.uses_tools:
                kwargs = {**kwargs, "tools": [t.model_dump(exclude_none=True) for t in req.tools]}
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception as e:  # template errors (e.g. role order) are the request's fault
            raise OpenAIError(f"could not apply the chat template: {e}", param="messages") from None
        # The template already emits <bos>; the tokenizer must not add another.
        return tokenizer.encode(prompt, add_special_tokens=False)

    @functools.cached_property
    def _special_tokens(self) -> re.Pattern | None:
        specials = sorted(set(getattr(self.tm.tokenizer, "all_special_tokens", None) or []), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, specials))) if specials else None

    def _visible(self, text: str) -> str:
        """Shown text without special tokens (kept in the decoded text for the calls and thinking)."""
        return self._special_tokens.sub("", text) if self._special_tokens else text

    def _separates_reasoning(self, req: ChatCompletionRequest) -> bool:
        return req.separate_reasoning and getattr(self.tm.server_args, "reasoning_parser", None) == "gemma4"

    def _keeps_markers(self, req: ChatCompletionRequest) -> bool:
        return req.uses_tools or self._separates_reasoning(req)

    def _response(self, req: ChatCompletionRequest, outs: list[dict]) -> dict:
        choices = []
        for i, out in enumerate(outs):
            meta = out["meta_info"]
            reason = meta["finish_reason"]
            if (error := abort_error(reason)) is not None:
                raise error
            text, message, finish = out["text"], {"role": "assistant"}, finish_reason_str(reason)
            if self._separates_reasoning(req):
                thinking, text = split_reasoning(text)
                message["reasoning_content"] = None if thinking is None else self._visible(thinking)
            message["content"] = text
            if self._keeps_markers(req):
                content, calls = split_tool_calls(text) if req.uses_tools else (text, [])
                message["content"] = self._visible(content)
                if calls:
                    message.update(content=message["content"].strip() or None, tool_calls=calls)
                    finish = "tool_calls"
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": chat_logprobs(meta, 0) if req.logprobs else None,
                    "finish_reason": finish,
                    "matched_stop": reason.get("matched") if reason else None,
                }
            )
        first = outs[0]["meta_info"]
        completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
        return {
            "id": new_id("chatcmpl"),
            "object": "chat.completion",
            "created": now(),
            "model": self.model_name,
            "choices": choices,
            "usage": usage(first["prompt_tokens"], completion, first["cached_tokens"]),
        }

    async def _stream(self, req: ChatCompletionRequest, gens: list[AsyncIterator[dict]]) -> AsyncIterator[str]:
        rid, created = new_id("chatcmpl"), now()
        include_usage, continuous = usage_options(req)

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None, meta: dict | None = None) -> str:
            body = {
                "id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            }
            if include_usage:
                body["usage"] = choice_usage(meta) if continuous and meta else None
            return sse(body)

        finals: list[dict | None] = [None] * len(gens)
        held = [HeldContent() for _ in gens] if req.uses_tools else None
        thinking = [ReasoningStream() for _ in gens] if self._separates_reasoning(req) else None
        keeps_markers = self._keeps_markers(req)
        for i in range(len(gens)):
            yield chunk(i, {"role": "assistant", "content": ""})
        try:
            async for d in stream_deltas(gens):
                logprobs = chat_logprobs(d.meta, d.token_start, d.token_end) if req.logprobs else None
                text, calls, final = d.text, [], d.reason is not None
                if thinking:
                    thought, text = thinking[d.index].add(text, final)
                    if thought := self._visible(thought):
                        yield chunk(d.index, {"reasoning_content": thought}, meta=d.meta)
                if held:
                    text, calls = held[d.index].add(text, final)
                if keeps_markers:
                    text = self._visible(text)
                if text or (logprobs and logprobs["content"]):
                    yield chunk(d.index, {"content": text}, logprobs=logprobs, meta=d.meta)
                if calls:
                    deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                    yield chunk(d.index, {"tool_calls": deltas}, meta=d.meta)
                if d.reason is not None:
                    finals[d.index] = d.meta
                    yield chunk(d.index, {}, finish="tool_calls" if calls else finish_reason_str(d.reason), meta=d.meta)
        except StreamAborted as e:
            yield sse(e.error.body())
            yield SSE_DONE
            return
        if include_usage and all(finals):
            completion = sum(m["completion_tokens"] for m in finals)
            yield sse({
                "id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                "choices": [], "usage": usage(finals[0]["prompt_tokens"], completion, finals[0]["cached_tokens"]),
            })
        yield SSE_DONE
