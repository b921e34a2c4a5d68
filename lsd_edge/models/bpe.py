"""The tiny models' tokenizer: a byte-level BPE trained with `tokenizers` on the recipe's own text.

A tiny model (the embedded default, a random-weight stand-in) has no pre-trained LLM to take a
tokenizer from, so one is trained on the text it will read: GPT-2's byte-level pre-tokenizer (a
plain `ByteLevel`, which llama.cpp knows as "gpt-2"), a ByteLevel decoder, the shared special tokens
first (`SPECIAL_TOKENS`, so `<image>` has the same id whatever the corpus) and the ChatML chat
template (`lsd_edge.models.tokens`). It is an ordinary tokenizer.json: PyTorch, ONNX Runtime,
transformers.js and llama.cpp (`lsd-edge export --gguf`) read it as they read Qwen's.

The vocabulary: all 256 bytes (any text encodes, nothing is `<unk>`), then merges until every word
of the corpus is one token or `MAX_VOCAB` is reached. ShapesVQA's text is closed (some fifty words,
each alone at the start of a turn and after a space), so the trainer runs out of pairs at about 400
tokens with every answer word ("red", "triangle", "yes") one token: an answer is one token and the
end of turn, and the embedding tables stay tiny. `MAX_VOCAB` caps a larger corpus (another tiny
recipe's data) so its tables stay tiny too, at the cost of longer words in pieces.

Deterministic: the same texts give a byte-identical tokenizer.json (merges are ranked by count, ties
broken by the pair, and the counts do not depend on the texts' order).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from lsd_edge.models.tokens import CHAT_ROLES, IMAGE_TOKEN, SPECIAL_TOKENS

MAX_VOCAB = 512
# What made the tiny models' tokenizer; a teacher cached with another kind is refused (train/teacher.py).
TOKENIZER_KIND = "byte-level BPE 1"


def word_corpus(words: Iterable[str]) -> list[str]:
    """A corpus over a word list: each word alone and after a space, as a chat turn has them (at the
    start of a turn, or inside one), so each trains to one token in both places."""
    words = sorted(set(words))
    return words + [" " + w for w in words]


def train_bpe(texts: Iterable[str], max_vocab: int = MAX_VOCAB) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (each image placeholder removed)
    and on the chat roles as the ChatML template writes them."""
    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    roles = [f"{role}\n" for role in CHAT_ROLES]  # "<|im_start|>user\n": the role and a newline
    tok.train_from_iterator((*(t.replace(IMAGE_TOKEN, "") for t in texts), *roles), trainer)
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
