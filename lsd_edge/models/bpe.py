"""The tiny models' tokenizer: a byte-level BPE trained with `tokenizers` on the recipe's own text.

A tiny model (the embedded default, a random-weight stand-in) has no pre-trained LLM to take a
tokenizer from, so one is trained on the text it will read: GPT-2's byte-level pre-tokenizer (a
plain `ByteLevel`, which llama.cpp knows as "gpt-2"), a ByteLevel decoder, the shared special tokens
first (`SPECIAL_TOKENS`, so `<image>` has the same id whatever the corpus) and the ChatML chat
template (`lsd_edge.models.tokens`). It is an ordinary tokenizer.json: PyTorch, ONNX Runtime,
transformers.js and llama.cpp (`lsd-edge export --gguf`) read it as they read Qwen's.

The vocabulary: all 256 bytes (any text encodes, nothing is `<unk>`), then merges learned on the
corpus's words, split at whitespace, until every word is one token or `MAX_VOCAB` is reached. So a
word never merges with the space before it (GPT-2's tokenizers have "Ġred" beside "red"): a word is
the same token at the start of a turn, where an answer stands, as inside a question or a caption,
and what a model learns of "red" from the captions serves its answers. Spaces are tokens of their
own ("Ġ"): a sentence is about twice as many tokens as words. (The embedded default's teacher, on
2 busy cores: 86.0% with the spaces attached, its answers' tokens seen only in answers; 88.0% with
them apart, its position questions still at chance; the word-level tokenizer's reached 93.0%.)
ShapesVQA's text is closed (some fifty words), so the trainer runs out of pairs at 364 tokens
with every answer ("red", "triangle", "yes") one token: an answer is one
token and the end of turn, and the embedding tables stay tiny. `MAX_VOCAB` caps a larger corpus
(another tiny recipe's data) so its tables stay tiny too, at the cost of rarer words in pieces.

Deterministic: the same texts give a byte-identical tokenizer.json (merges are ranked by count, ties
broken by the pair, and the counts do not depend on the texts' order).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from lsd_edge.models.tokens import CHAT_ROLES, IMAGE_TOKEN, SPECIAL_TOKENS

MAX_VOCAB = 512
# What made the tiny models' tokenizer; a teacher cached with another kind is refused (train/teacher.py).
TOKENIZER_KIND = "byte-level BPE 1"


def train_bpe(texts: Iterable[str], max_vocab: int = MAX_VOCAB) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` trained on the words of `texts` (split at whitespace,
    image placeholders removed) and on the chat roles; `texts` may be a plain word list."""
    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = (w for t in texts for w in t.replace(IMAGE_TOKEN, " ").split())
    tok.train_from_iterator(itertools.chain(words, CHAT_ROLES), trainer)
    return tok


def bpe_tokenizer(texts: Iterable[str], max_vocab: int = MAX_VOCAB) -> PreTrainedTokenizerFast:
    """`train_bpe` as a transformers tokenizer: `<pad>`, `<unk>`, `<|im_end|>` as EOS, no BOS, and
    decoding that gives the text back as it was (no clean-up of spaces before punctuation)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(texts, max_vocab),
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token=None,
        clean_up_tokenization_spaces=False,
    )
