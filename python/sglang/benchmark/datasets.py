"""Benchmark prompts: random text of exact token lengths, random ids, ShareGPT, shared-prefix groups.

Lengths follow SGLang's conventions: `--random-range-ratio r` draws each length uniformly from
[max(int(len * r), 1), len], so the default 0.0 gives varied lengths and 1.0 pins them.
Token counts are the ones the server will see: the prompt is re-encoded the way the server's
tokenizer encodes text (special tokens such as BOS included).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASET_NAMES = ("sharegpt", "random", "random-ids", "generated-shared-prefix")
# Re-encoding decoded random tokens can merge or split them; a few rounds of fixing converge.
_MAX_LENGTH_FIX_ROUNDS = 64


class DatasetError(ValueError):
    """The requested dataset cannot be built (missing file, nothing usable in it)."""


@dataclass
class DatasetRow:
    prompt: str  # text sent to text endpoints (and to /generate unless input_ids is set)
    prompt_len: int  # tokens the server sees for `prompt` (or len(input_ids))
    output_len: int  # max_new_tokens / max_tokens of the request
    input_ids: list[int] | None = None  # sent as `input_ids` by the native sglang backend


@dataclass
class TokenSampler:
    """Random prompts of exact token lengths for one tokenizer."""

    tokenizer: Any
    rng: random.Random
    pool: list[int] = field(default_factory=list)
    special_overhead: int = 0  # tokens encode() adds on its own (BOS for Gemma)

    def __post_init__(self):
        if not self.pool:
            self.pool = safe_token_pool(self.tokenizer)
        self.special_overhead = len(self.tokenizer.encode(""))

    def count(self, text: str) -> int:
        """Tokens the server gets for `text` (specials included, as its tokenizer encodes it)."""
        return len(self.tokenizer.encode(text))

    def random_ids(self, n: int) -> list[int]:
        return [self.rng.choice(self.pool) for _ in range(n)]

    def random_text(self, n: int) -> str:
        """Text that the tokenizer encodes to exactly `n` tokens, specials included."""
        target = max(n - self.special_overhead, 1)
        ids = self.random_ids(target)
        for _ in range(_MAX_LENGTH_FIX_ROUNDS):
            text = self.tokenizer.decode(ids)
            canon = self.tokenizer.encode(text, add_special_tokens=False)
            if len(canon) == target:
                return text
            # Work on the canonical tokenization so every round moves towards the target.
            ids = canon[:target] if len(canon) > target else canon + self.random_ids(target - len(canon))
        raise DatasetError(f"could not build a prompt of exactly {n} tokens with this tokenizer")


def safe_token_pool(tokenizer) -> list[int]:
    """Ids that are not special/added tokens and decode to text re-encoding to themselves.

    Such tokens keep random prompts readable (no control tokens or characters, no broken UTF-8
    byte pieces) and make the exact-length fix-up converge in a round or two.
    """
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    candidates = [i for i in range(len(tokenizer)) if i not in excluded]
    texts = tokenizer.batch_decode([[i] for i in candidates])
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pool = [i for i, t, e in zip(candidates, texts, encoded) if t.strip() and t.isprintable() and e == [i]]
    if not pool:
        raise DatasetError("the tokenizer has no plain tokens to build random prompts from")
    return pool


def random_lens(full_len: int, range_ratio: float, num: int, rng: random.Random) -> list[int]:
    if full_len <= 0:
        raise DatasetError(f"lengths must be positive, got {full_len}")
    low = max(int(full_len * range_ratio), 1)
    return [rng.randint(min(low, full_len), full_len) for _ in range(num)]


def sample_random_requests(
    sampler: TokenSampler, num_prompts: int, input_len: int, output_len: int, range_ratio: float, as_ids: bool = False
) -> list[DatasetRow]:
    """`random`: text of exact token lengths; with `as_ids` the canonical ids travel as input_ids."""
    in_lens = random_lens(input_len, range_ratio, num_prompts, sampler.rng)
    out_lens = random_lens(output_len, range_ratio, num_prompts, sampler.rng)
    rows = []
    for n_in, n_out in zip(in_lens, out_lens):
        text = sampler.random_text(n_in)
        ids = sampler.tokenizer.encode(text) if as_ids else None
        rows.append(DatasetRow(text, sampler.count(text), n_out, ids))
    return rows


def sample_random_ids_requests(
    sampler: TokenSampler, num_prompts: int, input_len: int, output_len: int, range_ratio: float
) -> list[DatasetRow]:
    """`random-ids`: raw random token ids (exact lengths on /generate); text endpoints get them decoded."""
    in_lens = random_lens(input_len, range_ratio, num_prompts, sampler.rng)
    out_lens = random_lens(output_len, range_ratio, num_prompts, sampler.rng)
    rows = []
    for n_in, n_out in zip(in_lens, out_lens):
        ids = sampler.random_ids(n_in)
        rows.append(DatasetRow(sampler.tokenizer.decode(ids), n_in, n_out, ids))
    return rows


def _read_conversations(path: Path) -> list[list[dict]]:
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:  # JSONL: one conversation record per line
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path} is neither JSON nor JSONL: {e}") from e
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a list of conversations")
    convs = [d.get("conversations", d.get("conversation")) for d in data if isinstance(d, dict)]
    return [c for c in convs if isinstance(c, list) and len(c) >= 2]


def sample_sharegpt_requests(
    sampler: TokenSampler,
    dataset_path: str,
    num_prompts: int,
    fixed_output_len: int | None = None,
    context_len: int | None = None,
    apply_chat_template: bool = False,
) -> list[DatasetRow]:
    """First human turn as the prompt, the reply's length (or a fixed one) as the output length."""
    if not dataset_path:
        raise DatasetError(
            "--dataset-name sharegpt needs --dataset-path pointing to a local ShareGPT JSON file "
            "(nothing is downloaded); or use --dataset-name random"
        )
    path = Path(dataset_path).expanduser()
    if not path.is_file():
        raise DatasetError(f"ShareGPT dataset file not found: {path}")
    convs = _read_conversations(path)
    sampler.rng.shuffle(convs)
    rows: list[DatasetRow] = []
    for conv in convs:
        if len(rows) == num_prompts:
            break
        prompt, completion = str(conv[0].get("value", "")), str(conv[1].get("value", ""))
        if apply_chat_template:
            prompt = chat_prompt(sampler.tokenizer, prompt)
        prompt_len = sampler.count(prompt)
        output_len = fixed_output_len or len(sampler.tokenizer.encode(completion, add_special_tokens=False))
        if prompt_len < 2 or output_len < 2:
            continue
        if context_len and prompt_len + output_len > context_len:
            continue
        rows.append(DatasetRow(prompt, prompt_len, output_len))
    if not rows:
        raise DatasetError(f"{path}: no usable conversations (need two turns of at least 2 tokens each)")
    return rows


def sample_generated_shared_prefix_requests(
    sampler: TokenSampler, num_groups: int, prompts_per_group: int, system_prompt_len: int, question_len: int, output_len: int
) -> list[DatasetRow]:
    """Groups of prompts sharing one long system prompt: exercises the prefix (radix) cache."""
    rows = []
    for _ in range(num_groups):
        system = sampler.random_text(system_prompt_len)
        for _ in range(prompts_per_group):
            prompt = f"{system}\n\n{sampler.random_text(question_len)}"
            rows.append(DatasetRow(prompt, sampler.count(prompt), output_len))
    sampler.rng.shuffle(rows)
    return rows


def chat_prompt(tokenizer, text: str) -> str:
    """The chat-formatted prompt, without the BOS that the server's encode adds again."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    return out[len(bos):] if bos and out.startswith(bos) else out


def get_dataset(args, tokenizer) -> list[DatasetRow]:
    sampler = TokenSampler(tokenizer, random.Random(args.seed))
    name = args.dataset_name
    if name == "random":
        return sample_random_requests(
            sampler, args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio,
            as_ids=args.tokenize_prompt,
        )
    if name == "random-ids":
        return sample_random_ids_requests(
            sampler, args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio
        )
    if name == "sharegpt":
        return sample_sharegpt_requests(
            sampler, args.dataset_path, args.num_prompts, args.sharegpt_output_len, args.sharegpt_context_len,
            args.apply_chat_template,
        )
    if name == "generated-shared-prefix":
        return sample_generated_shared_prefix_requests(
            sampler, args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
            args.gsp_question_len, args.gsp_output_len,
        )
    raise DatasetError(f"unknown dataset {name!r}; choose from {list(DATASET_NAMES)}")
