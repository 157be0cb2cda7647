"""A tiny, deterministic Gemma-4-style tokenizer for generated test checkpoints.

Byte-level BPE (so any UTF-8 text round-trips, emoji and CJK included) trained with the `tokenizers`
library on a fixed built-in English text. Special token ids follow Gemma 4 where tests rely on them:
`<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, `<mask>`=4, `<|turn>`=105, `<turn|>`=106. The tokenizer never
adds BOS by itself; the chat template emits it, as Gemma's does.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 768

PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
TURN_START, TURN_END = "<|turn>", "<turn|>"
TURN_START_ID, TURN_END_ID = 105, 106
# Extra stop token id listed in generation_config (the released generation_config stops on 50 too).
TOOL_RESPONSE_ID = 50
TOOL_RESPONSE = "<|tool_response>"

# Gemma 4 chat format: assistant is rendered as `model`; content may be a string or a list of parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{{ '<|turn>' + role + '\n' + text | trim + '<turn|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}{%- endif -%}"
)

# Fixed training text (written for this project). Changing it changes the vocabulary.
TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. A serving runtime reads a model checkpoint from disk,
builds the layers, loads the weights and answers requests one token at a time. Each request has a
prompt, a few sampling parameters and a limit on the number of new tokens. The scheduler groups the
requests into batches so that the accelerator stays busy, and the cache keeps the keys and values of
the tokens that were already seen, so they are not computed again.
What is the capital of France? The capital of France is Paris. What is the capital of Japan? The
capital of Japan is Tokyo. What is two plus two? Two plus two is four. Please write a short poem
about the sea. The sea is wide and the sea is deep, the waves are loud and the gulls never sleep.
Once upon a time there was a little robot who wanted to learn how to paint. Every morning the robot
walked to the hill behind the village, looked at the sky and tried to mix the right colours. Some
days the picture was too dark, other days it was too bright, but the robot kept trying, and after a
long summer the people of the village came to see the paintings and they were happy.
Mixture of experts models route every token to a small number of experts. A router computes a score
for each expert, keeps the best few, and the outputs of the chosen experts are added together with
their weights. Attention layers look at the previous tokens; sliding window layers only look at the
most recent ones, while full attention layers look at everything from the start of the sequence.
Numbers and symbols appear in text as well: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 42% $5 #1 (a)
[b] {c} <d> a+b=c x*y /path/to/file.txt user@example.com https://example.org/index.html; "quoted",
'single', under_score, camelCase, hyphen-ated, and so on. Questions, answers, lists and code:
def add(a, b): return a + b. for i in range(10): print(i). if x > 0 and y < 1: pass.
The weather today is sunny with a light wind from the west. Tomorrow it will rain in the morning and
clear up in the afternoon. Remember to bring an umbrella, a warm coat and a good book to read.
Thank you very much for your help. You are welcome. Good morning, good afternoon, good evening and
good night. How are you? I am fine, thank you, and you? I would like a cup of tea with milk, please.
"""


def special_tokens() -> list[str]:
    """Specials in id order 0..106 (ids 5..104 are reserved placeholders, as in Gemma's vocab)."""
    tokens = [PAD, EOS, BOS, UNK, MASK]
    tokens += [f"<unused{i}>" for i in range(len(tokens), TURN_START_ID)]
    tokens[TOOL_RESPONSE_ID] = TOOL_RESPONSE
    tokens += [TURN_START, TURN_END]
    assert tokens.index(TURN_START) == TURN_START_ID and tokens.index(TURN_END) == TURN_END_ID
    return tokens


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE; deterministic because the text and trainer settings are fixed."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT.strip().splitlines(), trainer=trainer)
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "mask_token": MASK,
        "add_bos_token": False,
        "add_eos_token": False,
        # Exact round trip of decoded text: no whitespace clean-up.
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict:
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK, "mask_token": MASK}


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(out_dir: str | Path) -> int:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the vocab size."""
    out = Path(out_dir)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"), pretty=True)
    _dump(out / "tokenizer_config.json", tokenizer_config())
    _dump(out / "special_tokens_map.json", special_tokens_map())
    return tok.get_vocab_size()
