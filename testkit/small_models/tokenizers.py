"""Tokenizers for the small models, trained locally with the ``tokenizers`` package.

Real checkpoints ship their tokenizers; the small models need ones of the same classes without a
download, so each is trained here on a short built-in corpus.
"""

from __future__ import annotations

import json

# Byte-level BPE learns its merges from this; prompt-like text keeps common words short.
_CORPUS = """\
a red fox sitting in the snow at sunrise, highly detailed photograph
a cat sleeping on a wooden table next to a window with soft morning light
a blue car driving along a mountain road under a cloudy sky
portrait of an old man with a white beard, studio lighting, black and white
a bowl of fresh fruit: apples, oranges, bananas and grapes on a kitchen counter
a small house by the lake surrounded by green trees and yellow flowers
an astronaut riding a horse on the moon, digital art, cinematic
the city skyline at night with bright lights reflected in the river
a girl in a red dress walking through a field of tall grass in summer
a dog running on the beach with waves in the background, golden hour
a cup of coffee and a book on a rainy day, cozy, warm colors
an oil painting of a ship on a stormy sea with dark clouds and lightning
a close-up of a butterfly on a purple flower, macro photo, shallow depth of field
a watercolor illustration of a forest path in autumn with orange leaves
a robot standing in the middle of a busy street, neon signs, futuristic
text that says "hello world" written on a chalkboard in white letters
two people sitting on a bench in the park and talking about the weather
The quick brown fox jumps over the lazy dog. 0123456789
system: you are a helpful assistant. user: draw a picture. assistant: think first
"""

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Plain added tokens in Qwen3 (special=False): they stay in decoded text.
_THINK_TOKENS = ["<think>", "</think>"]

# Qwen3's template, trimmed to what prompts need (no tools); the output for plain
# user/system/assistant messages matches the real one, including enable_thinking.
_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def qwen_tokenizer(vocab_size: int = 1024):
    """Train a byte-level BPE on the built-in corpus and wrap it as a ``Qwen2Tokenizer``."""
    from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    # Start from an empty Qwen2Tokenizer so training uses exactly its normalizer and
    # pre-tokenizer (regex split + byte level); then load the learnt vocab/merges into it.
    backend: Tokenizer = Qwen2Tokenizer().backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=32768,
        chat_template=_CHAT_TEMPLATE,
    )
    tok.add_special_tokens({"additional_special_tokens": _SPECIAL_TOKENS[1:]})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _THINK_TOKENS])
    return tok
