"""Per-request sampling parameters, SGLang's names and meanings.

Unset knobs stay None until the scheduler fills them from the model's generation_config (SGLang's
`--sampling-defaults model`), so the HTTP layer never needs to know the model's defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

_FALLBACK = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0}

# SGLang sampling parameters this server does not implement, with the values that mean "off"
# (None always does): clients send them at those values, so those pass; any other value is an error.
NEUTRAL_SAMPLING = {
    "n": (1,), "json_schema": (), "regex": (), "ebnf": (), "structural_tag": (), "custom_params": (),
}  # fmt: skip


class UnsupportedValue(ValueError):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def pop_neutral(d: dict, neutral: dict[str, tuple], where: str) -> None:
    """Remove from d the fields of `neutral` set to None or to one of their neutral values; raise
    UnsupportedValue naming the first one set to anything else (never silently ignored)."""
    for name in sorted(neutral.keys() & d.keys()):
        value = d.pop(name)
        if value is not None and not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral[name]):
            allowed = " or ".join(repr(v) for v in neutral[name]) or "null"
            raise UnsupportedValue(name, f"{where} '{name}' is not supported by this server (only {allowed}), got {value!r}")


@dataclass
class SamplingParams:
    max_new_tokens: int | None = 128
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # -1 or 0: no top-k cut
    min_p: float | None = None
    # sampling/penalizer.py: vLLM's and OpenAI's meanings; min_new_tokens holds back EOS and stop ids.
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_new_tokens: int = 0
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) -> bias in [-100, 100]
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        """Build from a user dict; unknown keys are an error, never silently dropped."""
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"sampling_params must be an object, got {type(d).__name__}")
        d = dict(d or {})
        if "sampling_seed" in d:  # SGLang's current name for seed
            seed = d.pop("sampling_seed")
            if d.get("seed") is not None and seed is not None and seed != d["seed"]:
                raise ValueError(f"seed {d['seed']!r} and sampling_seed {seed!r} disagree")
            d["seed"] = d.get("seed") if seed is None else seed
        pop_neutral(d, NEUTRAL_SAMPLING, "sampling parameter")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unsupported sampling parameter(s): {', '.join(unknown)}")
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        for key in ("stop", "stop_token_ids", "repetition_penalty", "frequency_penalty", "presence_penalty", "min_new_tokens"):
            if d.get(key) is None:  # null means the default
                d.pop(key, None)
        params = cls(**d)
        params.verify()
        return params

    def verify(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first mistyped or out-of-range parameter."""
        self._check_types()
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0):
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < -1):
            raise ValueError(f"top_k must be -1 (disabled) or a non-negative integer, got {self.top_k}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty <= 2:
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.min_new_tokens < 0 or (self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens):
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        self._check_logit_bias(vocab_size)
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise ValueError(f"stop_token_ids contains an invalid token id {t!r}")

    def _check_logit_bias(self, vocab_size: int | None) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be an object of token id -> bias, got {self.logit_bias!r}")
        for token, bias in self.logit_bias.items():
            if not str(token).isdigit() or (vocab_size is not None and int(token) >= vocab_size):
                raise ValueError(f"logit_bias has an invalid token id {token!r}")
            if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {bias!r} for token {token}")

    def _check_types(self) -> None:
        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value is not None and not is_num(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
        for name in ("max_new_tokens", "top_k", "seed", "min_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if not isinstance(self.stop, list) or not isinstance(self.stop_token_ids, list):
            raise ValueError("stop must be a string or a list of strings, and stop_token_ids a list of integers")

    def fill_defaults(self, defaults: dict | None) -> None:
        """Replace unset knobs with the model's generation_config values, then plain fallbacks."""
        if self.temperature is None and (defaults or {}).get("do_sample") is False:
            self.temperature = 0.0
        for name, fallback in _FALLBACK.items():
            if getattr(self, name) is None:
                value = (defaults or {}).get(name)
                setattr(self, name, fallback if value is None else value)
        if self.top_k == 0:
            self.top_k = -1

    @property
    def adjusts_logits(self) -> bool:
        """Whether sampling/penalizer.py has work for this request."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.min_new_tokens > 0 or bool(self.logit_bias))  # fmt: skip

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def to_dict(self) -> dict:
        return asdict(self)
