"""A word-piece tokenizer trained locally on the train split's text (no hub downloads)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, in this order
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
TOKENIZER_FILE = "tokenizer.json"
PIECE_CHARS = 1 << 16  # characters of text pre-tokenized at once


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """Build a lower-cased WordPiece tokenizer from ``texts``; the same texts give the same tokenizer.

    The vocabulary is the special tokens (fixed ids above), every character seen (alone and as a
    ``##`` continuation, so no word is ever wholly unknown), then whole words by descending count
    (ties by spelling) up to ``vocab_size``. Built in Python rather than with the tokenizers trainer,
    whose parallel merge order made every build's tokenizer.json differ.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        for piece in _pieces(text):  # a long text in pieces: pre_tokenize_str holds a tuple per word
            words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(piece)))
    chars = sorted({c for w in words for c in w})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    known = set(vocab)
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    return tok


def _pieces(text: str, size: int = PIECE_CHARS):
    """``text`` cut into pieces of about ``size`` characters, at whitespace so that no word is split."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start, start + size)
        for ws in "\n\t":
            cut = max(cut, text.rfind(ws, start, start + size))
        if cut <= start:  # one word longer than a piece: cut it (it is no word of a vocabulary anyway)
            cut = start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


def save_tokenizer(tok, directory: str | Path) -> Path:
    """Write ``tokenizer.json`` under ``directory``; return its path."""
    path = Path(directory) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def load_tokenizer(source: str | Path | bytes):
    """Load a tokenizer from a tokenizer.json path, its folder, or its JSON bytes."""
    from tokenizers import Tokenizer

    if isinstance(source, bytes):
        return Tokenizer.from_str(source.decode("utf-8"))
    path = Path(source)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return Tokenizer.from_file(str(path))


def encode(tok, text: str, max_tokens: int) -> list[int]:
    """Token ids of ``text`` as ``[CLS] ... [SEP]``, truncated to ``max_tokens``.

    A tokenizer that brings its own special tokens (a Hugging Face tokenizer.json has a post-processor:
    BERT's ``[CLS] ... [SEP]``, RoBERTa's ``<s> ... </s>``) adds those, with its own ids; ours has none.
    """
    enc = tok.encode(text, add_special_tokens=False)
    if tok.post_processor is None:
        return [CLS_ID, *enc.ids[: max(0, max_tokens - 2)], SEP_ID]
    enc.truncate(max(0, max_tokens - tok.post_processor.num_special_tokens_to_add(False)))
    out = tok.post_process(enc)  # pads too, if the file asks to: the loader pads, so padding is left out
    return [i for i, keep in zip(out.ids, out.attention_mask) if keep]
