"""Incremental detokenization (pure): whole characters only, stop strings held back and trimmed."""

from __future__ import annotations

from pdserve.serving.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """Token id = one byte, so multi-byte characters span several tokens."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")


def ids(text: str) -> list[int]:
    return list(text.encode())


def feed_one_by_one(detok: IncrementalDetokenizer, text: str) -> list[str]:
    return [detok.add([t]) for t in ids(text)]


def test_multibyte_characters_are_released_whole():
    detok = IncrementalDetokenizer(ByteTokenizer())
    pieces = feed_one_by_one(detok, "aé€")
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + detok.finish() == "aé€"
    assert pieces[1] == "" and pieces[2] == "é"  # é is two bytes: nothing after the first


def test_stop_string_is_trimmed_and_never_streamed():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["STOP"])
    streamed = "".join(feed_one_by_one(detok, "hello STOP and more"))
    streamed += detok.finish()
    assert detok.matched_stop == "STOP"
    assert streamed == "hello "
    assert detok.text == "hello "


def test_no_stop_trim_keeps_the_stop_string():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["\n\n"], no_stop_trim=True)
    streamed = "".join(feed_one_by_one(detok, "a\nb\n\nc")) + detok.finish()
    assert streamed == "a\nb\n\n"


def test_earliest_of_several_stop_strings_wins_across_chunks():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["xyz", "ab"])
    detok.add(ids("12a"))
    detok.add(ids("bxyz"))
    assert detok.matched_stop == "ab"
    assert detok.text == "12"


def test_of_stop_strings_ending_together_the_first_listed_wins():
    """vLLM's and SGLang's choice, and the engine's: the one that began first was taken."""
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["s.", "Paris."])
    detok.add(ids(" Paris"))
    detok.add(ids("."))
    assert detok.matched_stop == "s." and detok.text == " Pari"


def test_a_stop_string_before_an_unfinished_character_is_found_at_the_finish():
    """A token may complete a stop string and begin a character (SmolLM2's ' \\xe2\\x80'); the
    engine stops on it, but its text ends in U+FFFD, so the front end looked for no stop and
    released it all at the finish: ' \\ufffd' for stop ' '."""
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=[" "])
    assert detok.add(ids("ab")) == "ab"
    assert detok.add([ord(" "), 0xE2]) == ""
    assert detok.finish() == ""
    assert detok.matched_stop == " " and detok.text == "ab"
    kept = IncrementalDetokenizer(ByteTokenizer(), stop=["b "], no_stop_trim=True)
    assert kept.add(ids("ab")) == "a"
    assert kept.add([ord(" "), 0xE2, 0x80]) == ""
    assert kept.finish() == "b " and kept.text == "ab "


def test_held_back_prefix_of_a_stop_is_released_when_ruled_out():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["STOP"])
    assert detok.add(ids("abcST")) == "ab"  # "cST" might start "STOP"
    assert detok.add(ids("ill")) == "cST"
    assert detok.finish() == "ill"
    assert detok.matched_stop is None


def test_no_stop_string_ends_within_the_first_min_new_tokens_tokens():
    """vLLM's rule, as the engine's: the text of the first min_new_tokens tokens never
    matches, though a match may start there and end in a later token's text."""
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["a", "bc"], min_new_tokens=3)
    assert "".join(feed_one_by_one(detok, "abab")) == "abab"[:3]
    assert detok.matched_stop is None
    assert detok.add(ids("c")) == "" and detok.matched_stop == "bc"
    assert detok.text == "aba"


def test_min_new_tokens_boundary_inside_one_chunk():
    detok = IncrementalDetokenizer(ByteTokenizer(), stop=["a"], min_new_tokens=2)
    detok.add(ids("aaxa"))
    assert detok.matched_stop == "a" and detok.text == "aax"


def test_the_direct_decoder_gives_transformers_text_and_only_where_it_is_the_same(tmp_path):
    """The front end decodes with the fast tokenizer's backend only where transformers'
    decode would do nothing else: same text on ids of every kind, with either skip flag."""
    import random

    from transformers import AutoTokenizer

    from pdserve.engine.tiny_random import build_tokenizer
    from pdserve.serving.detokenizer import BackendDecoder, direct_decoder

    vocab_size = build_tokenizer(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    decoder = direct_decoder(tok)
    assert isinstance(decoder, BackendDecoder)
    rng = random.Random(0)
    for _ in range(200):  # specials, partial UTF-8 bytes, empty lists
        ids = [rng.randrange(vocab_size) for _ in range(rng.randrange(0, 9))]
        for skip in (True, False):
            assert decoder.decode(ids, skip_special_tokens=skip) == tok.decode(
                ids, skip_special_tokens=skip
            ), ids
    # Transformers post-processes here (or may): the tokenizer's own decode is kept.
    cleaning = AutoTokenizer.from_pretrained(str(tmp_path), clean_up_tokenization_spaces=True)
    assert direct_decoder(cleaning) is cleaning

    class Custom(type(tok)):
        def decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return "custom"

    custom = Custom.from_pretrained(str(tmp_path))
    assert direct_decoder(custom) is custom
    assert direct_decoder(ByteTokenizer()).decode([104, 105]) == "hi"
