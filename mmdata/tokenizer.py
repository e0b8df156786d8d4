"""A word-piece tokenizer trained locally on the train split's text (no hub downloads)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, in this order
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(5)
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """Train a lower-cased WordPiece tokenizer whose special tokens have the fixed ids above."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


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
    """Token ids of ``text`` as ``[CLS] ... [SEP]``, truncated to ``max_tokens``."""
    ids = tok.encode(text, add_special_tokens=False).ids[: max(0, max_tokens - 2)]
    return [CLS_ID, *ids, SEP_ID]
