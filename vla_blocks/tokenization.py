"""Tokenizers for the text expert: a local Qwen2 tokenizer when one is on disk, a byte-level one otherwise.

Nothing here downloads anything. :class:`TokenizerConfig` (a recipe field) picks the source:

- ``kind: auto`` — the Qwen2 tokenizer at ``path`` when that file/folder exists, else the offline
  byte-level tokenizer (so a recipe works on a machine without the checkpoint);
- ``kind: qwen2`` — ``path`` must hold a ``tokenizer.json`` (an error otherwise);
- ``kind: byte`` — the offline byte-level tokenizer: id = byte value (0–255), then the special tokens.

Whatever the source, the special tokens of :data:`SPECIAL_TOKENS` are added when missing (BAGEL/HALO:
``<|im_start|>`` / ``<|im_end|>`` around every text, ``<|vision_start|>`` / ``<|vision_end|>`` around
every image, HALO's ``<|action_start|>`` / ``<|action_end|>`` around the action chunk). With the
Qwen2.5 tokenizer the vision markers keep their ids (151652 / 151653) and the action markers are
appended (151665 / 151666).

Example::

    tok = TokenizerConfig(path="/ckpt/Qwen2.5-1.5B").build()      # byte-level if the folder is absent
    ids = tok.encode("pick up the cup")
    tok.vision_start_id, tok.action_end_id, len(tok)

:func:`build_offline_tokenizer` can also learn byte-level BPE merges from a small corpus (offline,
in a fraction of a second): short token sequences for tests and CPU training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

__all__ = ["SPECIAL_TOKENS", "TokenizerConfig", "HaloTokenizer", "build_offline_tokenizer", "load_qwen2_tokenizer"]

#: special tokens every HALO/BAGEL tokenizer carries (added when missing), in the order they are added
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                   "<|vision_end|>", "<|action_start|>", "<|action_end|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_level(tok):
    from tokenizers import decoders, pre_tokenizers
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_specials(tok, specials: Sequence[str]):
    from tokenizers import AddedToken
    missing = [s for s in specials if tok.token_to_id(s) is None]
    if missing:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in missing])
    return tok


def _raw_byte_tokenizer(special_tokens: Sequence[str] = SPECIAL_TOKENS):
    """The bare ``tokenizers.Tokenizer``: id = byte value, then ``special_tokens``."""
    from tokenizers import Tokenizer, models
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    return _add_specials(_byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[]))), special_tokens)


def build_offline_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512,
                            special_tokens: Sequence[str] = SPECIAL_TOKENS) -> "HaloTokenizer":
    """A byte-level tokenizer built in code (no file, no download).

    Without ``corpus``: no merges, id = byte value, special tokens from 256 on (263 ids in all).
    With ``corpus``: byte-level BPE merges learned from it up to ``vocab_size`` ids (special tokens
    first, then the 256 bytes, then merges), so frequent words become single tokens.
    """
    from tokenizers import Tokenizer, models, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    if corpus is None:
        return HaloTokenizer(_raw_byte_tokenizer(special_tokens), source="byte")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be >= {256 + len(special_tokens)} (bytes + special tokens), got {vocab_size}")
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    return HaloTokenizer(_add_specials(tok, special_tokens), source="byte-bpe")


def load_qwen2_tokenizer(path: str | Path, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> "HaloTokenizer":
    """The tokenizer of a local Qwen2/Qwen2.5 checkpoint (``tokenizer.json`` in ``path`` or ``path`` itself),
    with the missing special tokens (``<|action_start|>``, ``<|action_end|>``) appended."""
    from tokenizers import Tokenizer
    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {str(path)!r} (give a local Qwen2 checkpoint folder)")
    return HaloTokenizer(_add_specials(Tokenizer.from_file(str(f)), special_tokens), source=f"qwen2:{f}")


@dataclass
class TokenizerConfig:
    """Where the tokenizer comes from (see the module docstring). ``path``: a local Qwen2 checkpoint
    folder or ``tokenizer.json``; ``kind``: ``auto`` | ``qwen2`` | ``byte``."""

    # local Qwen2/Qwen2.5 checkpoint folder or its tokenizer.json (HALO: Qwen2.5-1.5B's); None: none on disk
    path: str | None = None
    # auto: Qwen2 at ``path`` when it exists, else byte-level; qwen2: ``path`` required; byte: offline byte-level
    kind: Literal["auto", "qwen2", "byte"] = "auto"
    # special tokens added when missing, in this order (BAGEL/HALO chat, vision and action markers)
    special_tokens: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS))

    def build(self) -> "HaloTokenizer":
        """The :class:`HaloTokenizer` this config selects (never downloads)."""
        if self.kind == "byte":
            return build_offline_tokenizer(special_tokens=self.special_tokens)
        if self.kind == "qwen2":
            if not self.path:
                raise ValueError("tokenizer.kind=qwen2 needs tokenizer.path (a local Qwen2 checkpoint folder)")
            return load_qwen2_tokenizer(self.path, self.special_tokens)
        if self.path and Path(self.path).exists():
            return load_qwen2_tokenizer(self.path, self.special_tokens)
        return build_offline_tokenizer(special_tokens=self.special_tokens)


class HaloTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids of the special tokens the sequence plans use.

    ``encode`` never adds special tokens (the plans place ``<|im_start|>`` / ``<|im_end|>`` themselves);
    ``decode`` drops them unless ``skip_special_tokens=False``.
    """

    def __init__(self, tokenizer, source: str = "custom"):
        self.tokenizer = tokenizer
        self.source = source
        self.bos_id = self.token_id("<|im_start|>")
        self.eos_id = self.token_id("<|im_end|>")
        self.vision_start_id = self.token_id("<|vision_start|>")
        self.vision_end_id = self.token_id("<|vision_end|>")
        self.action_start_id = self.token_id("<|action_start|>")
        self.action_end_id = self.token_id("<|action_end|>")

    def token_id(self, token: str) -> int:
        """The id of ``token``; ``KeyError`` naming the tokenizer's source when it has none."""
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the tokenizer ({self.source})")
        return i

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens (the sequence plans place them)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (special tokens dropped unless ``skip_special_tokens=False``)."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        """The largest token id (added tokens included): the embedding needs ``max_id + 1`` rows."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values())

    def save(self, path: str | Path):
        """Write ``tokenizer.json`` (loadable with ``TokenizerConfig(path=..., kind="qwen2")``)."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(p / "tokenizer.json"))

    def __repr__(self) -> str:
        return f"HaloTokenizer({self.source}, {len(self)} ids)"
