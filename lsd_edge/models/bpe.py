"""The tiny models' tokenizer: a byte-level BPE trained with `tokenizers` on the recipe's own text.

A tiny model (the embedded default, a random-weight stand-in) has no pre-trained LLM to take a
tokenizer from, so one is trained on the text it will read: GPT-2's byte-level pre-tokenizer (a
plain `ByteLevel`, which llama.cpp knows as "gpt-2"), a ByteLevel decoder, the shared special tokens
first (`SPECIAL_TOKENS`, so `<image>` has the same id whatever the corpus) and the ChatML chat
template (`lsd_edge.models.tokens`). It is an ordinary tokenizer.json: PyTorch, ONNX Runtime,
transformers.js and llama.cpp (`lsd-edge export --gguf`) read it as they read Qwen's.

The vocabulary: all 256 bytes (any text encodes, nothing is `<unk>`), then merges learned on the
corpus as GPT-2's are, each word with the space before it ("Ġred"), until no pair is left or
`MAX_VOCAB` is reached. Each text is learned with a space in front, as the chat template writes an
answer (`lsd_edge.models.tokens.CHAT_TEMPLATE` puts one space between the assistant's turn and its
content): an answer is then the very token its word is inside a caption or a question ("Ġred"
everywhere), so what a model learns of "red" from the captions serves its answers, and a sentence is
as many tokens as words, as with a word-level tokenizer. (Two earlier designs cost the embedded
default's teacher 5 to 8 points: merges learned with the answers' words bare, so "red" as an answer
was another token than "Ġred" in the captions, and spaces kept out of the merges, which doubled
every sequence.) ShapesVQA's text is closed (some fifty words), so the trainer runs out of pairs
under 400 tokens with every word one token. `MAX_VOCAB` caps a larger corpus (another tiny
recipe's data) so the embedding tables stay tiny, at the cost of rarer words in pieces.

A student distilled across tokenizers (`student.tokenizer`, `lsd_edge.distill.cross_vocab`) may
instead have a BPE of another size (`bpe_tokenizer(texts, max_vocab)`: rarer words in pieces) or a
word-level tokenizer (`word_tokenizer`: one token per bare word, "red" rather than "Ġred", ids in
order of frequency), so its vocabulary shares few strings and almost no ids with the teacher's.

Deterministic: the same texts give a byte-identical tokenizer.json (merges are ranked by count, ties
broken by the pair, and the counts do not depend on the texts' order).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

from lsd_edge.models.tokens import CHAT_ROLES, IMAGE_TOKEN, SPECIAL_TOKENS

MAX_VOCAB = 512
# What made the tiny models' tokenizer; a teacher cached with another kind is refused (train/teacher.py).
TOKENIZER_KIND = "byte-level BPE 2"


def train_bpe(texts: Iterable[str], max_vocab: int = MAX_VOCAB) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (image placeholders removed), each
    with a space in front, and on the chat roles as the template writes them (bare, after
    `<|im_start|>`); `texts` may be a plain word list."""
    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [t.replace(IMAGE_TOKEN, " ") for t in texts]
    # each text as a turn holds it (bare words at a line's start) and after a space (as an answer)
    tok.train_from_iterator(itertools.chain(texts, (" " + t for t in texts), CHAT_ROLES), trainer)
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


def word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on `texts` (and the chat roles): each run of word characters or
    of punctuation one token, whitespace dropped (decoded words are joined by one space), the shared
    special tokens first; `<pad>`, `<unk>`, `<|im_end|>` as EOS, no BOS."""
    tok = Tokenizer(tokenizer_models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    texts = [t.replace(IMAGE_TOKEN, " ") for t in texts]
    tok.train_from_iterator(itertools.chain(texts, CHAT_ROLES), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token=None,
        clean_up_tokenization_spaces=False,
    )
