"""The locally trained tokenizer: fixed special ids, deterministic, never wholly unknown."""

from __future__ import annotations

from mmdata.tokenizer import CLS_ID, SEP_ID, encode, load_tokenizer, save_tokenizer, train_tokenizer

TEXTS = ["zero one two", "Three four five", "six seven eight nine", "seven seven"]


def test_same_texts_give_the_same_tokenizer_file(tmp_path):
    a = save_tokenizer(train_tokenizer(TEXTS, 100), tmp_path / "a").read_bytes()
    b = save_tokenizer(train_tokenizer(list(reversed(TEXTS)), 100), tmp_path / "b").read_bytes()
    assert a == b


def test_encode_round_trip_and_unseen_words(tmp_path):
    tok = load_tokenizer(save_tokenizer(train_tokenizer(TEXTS, 100), tmp_path))
    ids = encode(tok, "Seven NINE", max_tokens=8)
    assert ids[0] == CLS_ID and ids[-1] == SEP_ID
    assert tok.decode(ids[1:-1]) == "seven nine"
    unseen = encode(tok, "zone", max_tokens=16)  # spelled from characters, not [UNK]
    assert tok.decode(unseen[1:-1]) == "zone"
    assert len(encode(tok, "one two three four five", max_tokens=4)) == 4
