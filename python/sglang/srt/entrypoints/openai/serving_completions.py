"""POST /v1/completions: one or several prompts (text or token ids), n choices each, stream or not.

Choice index = prompt_index * n + j, as OpenAI numbers them.
"""

from __future__ import annotations

from typing import AsyncIterator


from sglang.srt.entrypoints.openai.protocol import NEUTRAL_COMPLETION_FIELDS, CompletionRequest
from sglang.srt.entrypoints.openai.serving_base import (
    MAX_TOP_LOGPROBS,
    SSE_DONE,
    OpenAIError,
    ServingBase,
    StreamAborted,
    check_common,
    choice_usage,
    abort_error,
    completion_logprobs,
    joined_logprobs,
    finish_reason_str,
    new_id,
    now,
    sampling_params_dict,
    sse,
    stream_deltas,
    usage,
    usage_options,
)
from sglang.srt.managers.io_struct import GenerateReqInput


class OpenAIServingCompletion(ServingBase):
    request_cls = CompletionRequest
    neutral_fields = NEUTRAL_COMPLETION_FIELDS

    @staticmethod
    def _prompts(prompt) -> list[dict]:
        """Normalise the four accepted prompt shapes to a list of {text} / {input_ids}."""
        if isinstance(prompt, str):
            return [{"text": prompt}]
        if not prompt:
            raise OpenAIError("prompt must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [{"input_ids": list(prompt)}]
        if all(isinstance(p, str) for p in prompt):
            return [{"text": p} for p in prompt]
        if all(isinstance(p, list) for p in prompt):
            return [{"input_ids": p} for p in prompt]
        raise OpenAIError("prompt must be a string, a list of strings, a list of token ids, or a list of such lists", param="prompt")

    def _build_inputs(self, req: CompletionRequest) -> list[GenerateReqInput]:
        check_common(req, req.max_tokens)
        scored = req.echo and req.logprobs is not None  # the prompt's logprobs too (e.g. lm-eval's loglikelihood)
        if scored and req.max_tokens == 0:
            raise OpenAIError("echo with logprobs needs max_tokens >= 1 here (the prompt is scored with the first token)",
                              param="max_tokens")  # fmt: skip
        self._echoes(req)  # a prompt it cannot echo is a 400 before anything runs
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
            raise OpenAIError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="logprobs")
        objs = []
        for prompt in self._prompts(req.prompt):
            for j in range(req.n):
                objs.append(
                    GenerateReqInput(
                        **prompt,
                        sampling_params=sampling_params_dict(req, req.max_tokens, j),
                        stream=req.stream,
                        return_logprob=req.logprobs is not None,
                        top_logprobs_num=req.logprobs or 0,
                        logprob_start_len=0 if scored else -1,
                    )
                )
        return objs

    def _echoes(self, req: CompletionRequest) -> list[str]:
        """Per prompt, the text `echo` puts before its choices' completions ("" without echo)."""
        prompts = self._prompts(req.prompt)
        if not req.echo:
            return [""] * len(prompts)
        if self.tm.tokenizer is None and any("text" not in p for p in prompts):
            raise OpenAIError("echo of token-id prompts needs a tokenizer; this server runs with --skip-tokenizer-init", param="echo")
        return [p["text"] if "text" in p else self.tm.tokenizer.decode(p["input_ids"]) for p in prompts]

    @staticmethod
    def _logprobs(req: CompletionRequest, meta: dict, echo: str) -> dict | None:
        if req.logprobs is None:
            return None
        out = completion_logprobs(meta, 0, None, len(echo))
        return joined_logprobs(completion_logprobs(meta, 0, None, 0, "input"), out) if req.echo else out

    def _response(self, req: CompletionRequest, outs: list[dict]) -> dict:
        choices, prompt_tokens, cached = [], 0, 0
        echoes = self._echoes(req)
        for i, out in enumerate(outs):
            meta = out["meta_info"]
            reason = meta["finish_reason"]
            if (error := abort_error(reason)) is not None:
                raise error
            if i % req.n == 0:  # count each prompt once, however many choices it has
                prompt_tokens += meta["prompt_tokens"]
                cached += meta["cached_tokens"]
            choices.append(
                {
                    "index": i,
                    "text": echoes[i // req.n] + out.get("text", ""),
                    "logprobs": self._logprobs(req, meta, echoes[i // req.n]),
                    "finish_reason": finish_reason_str(reason),
                    "matched_stop": reason.get("matched") if reason else None,
                }
            )
        completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
        return {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": now(),
            "model": self.model_name,
            "choices": choices,
            "usage": usage(prompt_tokens, completion, cached),
        }

    async def _stream(self, req: CompletionRequest, gens: list[AsyncIterator[dict]]) -> AsyncIterator[str]:
        rid, created = new_id("cmpl"), now()
        include_usage, continuous = usage_options(req)

        def chunk(index: int, text: str, finish: str | None = None, logprobs=None, meta: dict | None = None) -> str:
            body = {
                "id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
            }
            if include_usage:
                body["usage"] = choice_usage(meta) if continuous and meta else None
            return sse(body)

        finals: list[dict | None] = [None] * len(gens)
        echoes, echoed = self._echoes(req), set()
        try:
            async for d in stream_deltas(gens):
                echo = echoes[d.index // req.n]
                if req.echo and d.index not in echoed:
                    # A choice's first update echoes the prompt (whose logprobs are known from then on).
                    echoed.add(d.index)
                    prompt_lp = completion_logprobs(d.meta, 0, None, 0, "input") if req.logprobs is not None else None
                    yield chunk(d.index, echo, None, prompt_lp, d.meta)
                logprobs = None
                if req.logprobs is not None:
                    logprobs = completion_logprobs(d.meta, d.token_start, d.token_end, d.text_offset + len(echo))
                if d.text or d.reason is not None or (logprobs and logprobs["tokens"]):
                    yield chunk(d.index, d.text, finish_reason_str(d.reason), logprobs, d.meta)
                if d.reason is not None:
                    finals[d.index] = d.meta
        except StreamAborted as e:
            yield sse(e.error.body())
            yield SSE_DONE
            return
        if include_usage and all(finals):
            prompt = sum(m["prompt_tokens"] for k, m in enumerate(finals) if k % req.n == 0)
            cached = sum(m["cached_tokens"] for k, m in enumerate(finals) if k % req.n == 0)
            completion = sum(m["completion_tokens"] for m in finals)
            yield sse({"id": rid, "object": "text_completion", "created": created, "model": self.model_name, "choices": [], "usage": usage(prompt, completion, cached)})
        yield SSE_DONE
