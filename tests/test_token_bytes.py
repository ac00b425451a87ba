"""Chat logprobs' ``bytes``: the real UTF-8 of each token, also of a token
that holds part of a character (whose text is U+FFFD)."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cmiguard.serve.token_bytes import byte_level_alphabet, is_byte_level, token_bytes_of


def test_the_byte_level_alphabet_is_a_bijection_onto_the_bytes():
    alphabet = byte_level_alphabet()
    assert len(alphabet) == 256 and sorted(alphabet.values()) == list(range(256))
    assert alphabet["A"] == 65 and alphabet["Ġ"] == 32 and alphabet["Ċ"] == 10


def test_split_characters_are_rebuilt_from_the_tokens_bytes(teacher):
    _, tokenizer = teacher
    assert is_byte_level(tokenizer)
    token_bytes = token_bytes_of(tokenizer)
    text = "Hi 🙂 café 日本語 <|im_end|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    texts = [tokenizer.decode([t]) for t in ids]
    assert sum("\ufffd" in t for t in texts) >= 2  # characters split across tokens
    assert b"".join(bytes(token_bytes(t)) for t in ids) == text.encode()
    # every token of the vocabulary: its bytes read as its text, U+FFFD where partial
    for t in range(len(tokenizer)):
        assert bytes(token_bytes(t)).decode(errors="replace") == tokenizer.decode([t]), t


def test_other_tokenizers_give_the_bytes_of_the_decoded_text():
    vocab = {"[UNK]": 0, "café": 1, "日本": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    assert not is_byte_level(tokenizer)
    token_bytes = token_bytes_of(tokenizer)
    assert [bytes(token_bytes(t)) for t in (1, 2)] == ["café".encode(), "日本".encode()]
