"""Replies cut at end-of-turn, stop sequences and max_tokens, streamed or not (real tokenizer)."""

import pytest

from cmiguard.serve.replies import Reply

EOS = 2


def build(tokenizer, text, streamed, stops=(), max_tokens=64, eos_after=None):
    """Feed ``text``'s tokens (then an end-of-turn token, if ``eos_after``) one by
    one; the reply and, streamed, the pieces taken after every token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if eos_after is not None:
        ids = ids[:eos_after] + [EOS] + ids[eos_after:]
    reply = Reply(tuple(stops), max_tokens, streamed, tokenizer.decode, {EOS})
    pieces = []
    for i, token in enumerate(ids):
        reply.add(token, lambda i=i: {"index": i})
        if streamed:
            pieces.append(reply.take())
    reply.close()
    if streamed:
        pieces.append(reply.take())
    return reply, pieces


@pytest.mark.parametrize(
    ("text", "stops", "max_tokens", "eos_after"),
    [
        (" Paris.\n\nThe answer", (), 64, None),
        (" Paris.\n\nThe answer", ("\n\nThe",), 64, None),  # a stop over three tokens
        (" Paris.\n\nThe answer", ("xyz", "."), 64, None),
        (" Paris.\n\nThe answer", ("aris",), 64, None),  # inside the first token
        (" Paris.\n\nThe answer", ("\n\nX",), 64, None),  # a prefix that never completes
        (" Paris.\n\nThe answer", (), 3, None),
        (" Paris.\n\nThe answer", ("answer",), 64, 3),  # the end of turn comes first
        ("I 😀 café 日本語", (), 64, None),  # characters split over tokens
        ("I 😀 café 日本語", ("本",), 64, None),
    ],
)
def test_streamed_pieces_add_up_to_the_unstreamed_reply(
    teacher, text, stops, max_tokens, eos_after
):
    tokenizer = teacher[1]
    whole, _ = build(tokenizer, text, False, stops, max_tokens, eos_after)
    streamed, pieces = build(tokenizer, text, True, stops, max_tokens, eos_after)
    assert streamed.result() == whole.result()
    assert "".join(t for t, _ in pieces) == whole.text
    assert [e for _, es in pieces for e in es] == whole.entries
    for sent, _ in pieces:  # no half character, nothing a stop sequence takes back
        assert "\ufffd" not in sent
    assert len([t for t, _ in pieces if t]) > 1 or len(whole.tokens) <= 1


def test_where_replies_end(teacher):
    tokenizer = teacher[1]
    text = " Paris.\n\nThe answer"  # tokens: " Paris" "." "\n" "\n" "The" " answer"
    free, _ = build(tokenizer, text, False)
    assert free.finish == "length" and free.text == text and len(free.tokens) == 6
    # the text stops where the stop sequence starts, the tokens before the one it starts in
    stop, pieces = build(tokenizer, text, True, ["\n\nThe"])
    assert stop.finish == "stop" and stop.text == " Paris." and len(stop.tokens) == 2
    assert all("\n" not in t for t, _ in pieces)
    inside, _ = build(tokenizer, text, False, ["aris"])
    assert inside.text == " P" and inside.tokens == [] and inside.finish == "stop"
    eos, _ = build(tokenizer, text, True, eos_after=2)
    assert eos.finish == "stop" and eos.text == " Paris." and eos.entries == free.entries[:2]
    short, _ = build(tokenizer, text, True, max_tokens=3)
    assert short.finish == "length" and short.text == " Paris.\n"
    # a held-back prefix of a stop that never completes is sent at the end
    held, pieces = build(tokenizer, " Paris.\n", True, ["\n\nThe"])
    assert pieces[-2] == ("", []) and pieces[-1][0] == "\n" and held.finish == "length"
