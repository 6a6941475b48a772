"""Tokenizer construction and loading.

The project ships a tiny character-level tokenizer (``builtin:char``) so that
training and tests work fully offline.  It is stored as a regular Hugging Face
tokenizer directory and can be loaded with ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
BASE_SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
CHAT_ROLE_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
DEFAULT_ALPHABET: str = "".join(c for c in string.printable if c not in "\x0b\x0c")
BUILTIN_CHAR_SPEC = "builtin:char"
CHAR_TOKENIZER_DIRNAME = "char_tokenizer"


def _char_vocab(alphabet: str) -> dict[str, int]:
    """Return the vocab: special tokens, chat-role markers, then unique alphabet chars."""
    tokens: list[str] = list(BASE_SPECIAL_TOKENS) + list(CHAT_ROLE_TOKENS)
    seen = set(tokens)
    for ch in alphabet:
        if ch not in seen:
            seen.add(ch)
            tokens.append(ch)
    return {tok: idx for idx, tok in enumerate(tokens)}


def _build_backend(alphabet: str) -> Tokenizer:
    """Build a raw ``tokenizers`` char-level tokenizer (BPE without merges)."""
    vocab = _char_vocab(alphabet)
    # No normalizer and no pre-tokenizer: the whole input is one "word" split
    # into characters; with no merges, every character is its own token.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    # Fuse concatenates tokens verbatim (the default would join with spaces).
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(
        [
            AddedToken(tok, special=True, normalized=False, lstrip=False, rstrip=False)
            for tok in (*BASE_SPECIAL_TOKENS, *CHAT_ROLE_TOKENS)
        ]
    )
    return backend


def build_char_tokenizer(out_dir: str | Path, alphabet: str | None = None) -> Path:
    """Build the character-level tokenizer and save it to ``out_dir``.

    Ids: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then
    ``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>`` (4..7), then
    the alphabet characters in order.  ``decode(encode(s)) == s`` holds for any
    string over the alphabet.

    Returns the output directory path.
    """
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    backend = _build_backend(DEFAULT_ALPHABET if alphabet is None else alphabet)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(CHAT_ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000_000,
    )
    fast.save_pretrained(str(out_path))
    return out_path


def _ensure_pad(tokenizer: PreTrainedTokenizerBase, spec: str) -> PreTrainedTokenizerBase:
    """Require an eos token; set pad = eos when no pad token is defined."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {spec!r} has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(spec: str, cache_dir: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from ``spec``.

    ``"builtin:char"`` builds the char tokenizer once into
    ``cache_dir/char_tokenizer`` (reused if present) and loads it; any other
    spec is a local tokenizer directory.  Raises ``ValueError`` if the
    directory does not exist or the tokenizer has no eos token.
    """
    if spec == BUILTIN_CHAR_SPEC:
        path = Path(cache_dir) / CHAR_TOKENIZER_DIRNAME
        if not (path / "tokenizer.json").is_file():
            build_char_tokenizer(path)
    else:
        path = Path(spec)
        if not path.is_dir():
            raise ValueError(f"tokenizer directory does not exist: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return _ensure_pad(tokenizer, spec)
