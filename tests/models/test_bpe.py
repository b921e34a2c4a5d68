"""The tiny models' byte-level BPE tokenizer: deterministic, every ShapesVQA answer one token, the
shared special tokens and chat template, a pre-tokenizer llama.cpp knows; a teacher cached with the
earlier word-level tokenizer is refused."""

from __future__ import annotations

import json

from lsd_edge.data.shapes import COLORS, KINDS, NUMBERS, vocabulary
from lsd_edge.export.gguf.llm import tokenizer_facts
from lsd_edge.models.bpe import MAX_VOCAB, TOKENIZER_KIND, train_bpe
from lsd_edge.models.build import build_tiny_processor, tiny_processor
from lsd_edge.models.tokens import CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL_TOKENS
from lsd_edge.recipe.schema import VisionSize


def _texts(shapes_dir) -> list[str]:
    """Every turn of the generated ShapesVQA files, as `corpus_texts` reads them."""
    return [
        turn["value"]
        for name in ("pretrain", "instruct", "eval")
        for rec in json.loads((shapes_dir / f"{name}.json").read_text())
        for turn in rec["conversations"]
    ]


def test_two_builds_give_byte_identical_tokenizer_json(shapes_dir, tmp_path):
    texts = _texts(shapes_dir)
    for i, order in enumerate((texts, texts[::-1])):  # the texts' order does not matter either
        tiny_processor(order, 32, 8).tokenizer.save_pretrained(tmp_path / str(i))
    a, b = ((tmp_path / str(i) / "tokenizer.json").read_bytes() for i in (0, 1))
    assert a == b


def test_every_answer_word_is_one_token_in_a_small_vocabulary(shapes_dir):
    texts = _texts(shapes_dir)
    tok = tiny_processor(texts, 32, 8).tokenizer
    answers = {t for t in texts if " " not in t and IMAGE_TOKEN not in t}
    assert answers >= {"yes", "no"} and answers & set(COLORS) and answers & set(KINDS)
    assert answers <= set(COLORS) | set(KINDS) | set(NUMBERS) | {"yes", "no"}
    for word in sorted(answers):  # as the chat template writes an answer: after a space
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    assert 256 + len(SPECIAL_TOKENS) < len(tok) <= MAX_VOCAB


def test_special_tokens_chat_template_and_round_trip(shapes_dir):
    processor = build_tiny_processor(VisionSize(image_size=32, patch_size=8), _texts(shapes_dir))
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert processor.image_token_id == SPECIAL_TOKENS.index(IMAGE_TOKEN)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<pad>", None)
    assert processor.chat_template == CHAT_TEMPLATE
    text = "what color is the shape in the top left ?"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
        {"role": "assistant", "content": "red"},
    ]
    rendered = processor.apply_chat_template(messages)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    # the specials and roles are single tokens; the answer is one token before the end of turn
    assert pieces[:3] == ["<|im_start|>", "user", "Ċ"] and IMAGE_TOKEN in pieces
    assert pieces[-6:] == ["<|im_start|>", "assistant", "Ċ", "Ġred", "<|im_end|>", "Ċ"]
    assert tok.decode(ids) == rendered  # byte-level: the text back as it was, spaces included
    assert tok.unk_token_id not in tok("naïve 🙂 text", add_special_tokens=False)["input_ids"]


def test_llama_cpp_knows_the_pre_tokenizer(shapes_dir):
    tok = tiny_processor(vocabulary(), 32, 8).tokenizer
    facts = tokenizer_facts(tok, "tiny")
    assert facts["pre"] == "gpt-2" and facts["merges"]


def test_a_word_is_the_same_token_in_an_answer_a_question_and_a_caption(shapes_dir):
    """Merges learned with the space before each word, and the answer written after a space: "red"
    is the token "Ġred" wherever it stands, and a sentence is one token per word."""
    processor = tiny_processor(_texts(shapes_dir), 32, 8)
    tok = processor.tokenizer
    red = tok.convert_tokens_to_ids("Ġred")
    ids = tok("is the red shape in the top left ?", add_special_tokens=False)["input_ids"]
    assert ids.count(red) == 1 and len(ids) == 9  # nine words, nine tokens
    answer = [{"role": "user", "content": "what color ?"}, {"role": "assistant", "content": "red"}]
    rendered = tok(processor.apply_chat_template(answer), add_special_tokens=False)["input_ids"]
    assert red in rendered
    words = train_bpe(["alpha", "beta"])
    assert words.encode(" beta alpha").tokens == ["Ġbeta", "Ġalpha"]


def test_a_teacher_cached_with_the_word_level_tokenizer_is_refused(recipe_dict, tmp_path):
    from lsd_edge.identity import Manifest
    from lsd_edge.recipe.load import parse_recipe
    from lsd_edge.train.teacher import teacher_manifest

    manifest = teacher_manifest(parse_recipe(recipe_dict))
    assert manifest.tied_to["tokenizer"] == TOKENIZER_KIND
    old = {k: v for k, v in manifest.tied_to.items() if k != "tokenizer"}  # as written before it
    Manifest(manifest.what, old).write(tmp_path)
    assert manifest.problems(tmp_path) == [f"tokenizer changed (default -> {TOKENIZER_KIND!r})"]


def test_memory_estimate_counts_the_tokenizer_the_run_builds(recipe_dict):
    """`lsd-edge memory` sizes the tiny models' embedding tables with the tokenizer the run trains:
    on the generated data, and before it is generated, on ShapesVQA's words."""
    from lsd_edge.data.prepare import corpus_texts, prepare_data
    from lsd_edge.models.build import padded_vocab
    from lsd_edge.progress import QuietReporter
    from lsd_edge.recipe.load import parse_recipe
    from lsd_edge.train.memory import recipe_configs

    recipe = parse_recipe(recipe_dict)
    multiple = recipe.teacher.tiny.pad_vocab_to_multiple_of
    before = recipe_configs(recipe)[0].text_config.vocab_size
    assert before == padded_vocab(len(train_bpe(vocabulary()).get_vocab()), multiple)
    prepare_data(recipe, QuietReporter())
    rows = len(tiny_processor(corpus_texts(recipe), 32, 8).tokenizer)
    assert recipe_configs(recipe)[0].text_config.vocab_size == padded_vocab(rows, multiple)
