"""Chat conversations for SFT: validation, tokenization and the assistant loss mask.

A conversation is a list of ``{"role": "system" | "user" | "assistant",
"content": str}`` messages.  :func:`tokenize_conversation` turns it into token
ids plus a ``uint8`` loss mask that is 1 exactly on the tokens the model must
learn to produce (the assistant turns) and 0 on the context.

Two renderings are supported:

* **Hugging Face chat template** (``tokenizer.chat_template`` is set): the
  conversation is rendered with ``apply_chat_template`` and each assistant
  turn's tokens are found by prefix differences.  For assistant message ``i``::

      prefix = template(messages[:i], add_generation_prompt=True)
      full   = template(messages[:i + 1])
      assistant tokens = full[len(prefix):]

  Every rendering must extend the previous one token for token (the previous
  ``full`` is a prefix of the next ``prefix``, and ``prefix`` is a prefix of
  ``full``); otherwise the template is not *prefix-stable* (for example it
  rewrites earlier turns) and a ``ValueError`` is raised.  If an assistant
  span does not end with ``eos_token_id`` (ChatML's turn end is
  ``<|im_end|>``, not eos), an eos token is inserted right after the span and
  is part of the loss, so the model learns to stop.  Messages after the last
  assistant turn are kept as context (loss 0).  Because an empty conversation
  cannot be rendered, the first assistant message must follow at least one
  system/user message on this path.

* **Built-in template** (no chat template): every message is rendered as
  ``<|role|> content <|end|>`` using the tokenizer's single-token role markers
  (``<|system|>``, ``<|user|>``, ``<|assistant|>``, ``<|end|>``), and an eos
  token is appended after each assistant turn.  Loss is on the assistant
  content, its ``<|end|>`` and that eos.  Content is tokenized with
  ``split_special_tokens=True`` so text such as ``"<|user|>"`` inside a
  message cannot forge a role marker.

BOS: if the tokenizer has a ``bos_token_id`` and the rendering does not
already start with it, it is prepended once (loss 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ROLES: tuple[str, ...] = ("system", "user", "assistant")
BUILTIN_ROLE_TOKENS: dict[str, str] = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}
BUILTIN_END_TOKEN = "<|end|>"


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation and return it as a list of message dicts.

    Raises ``ValueError`` unless ``messages`` is a non-empty list of objects
    with ``role`` in :data:`ROLES` and a string ``content``, containing at
    least one assistant message.  Extra keys in a message are kept.
    """
    if not isinstance(messages, list):
        raise ValueError(f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ValueError("'messages' is empty")
    out: list[dict[str, Any]] = []
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {j} must be an object, got {type(msg).__name__}")
        if "role" not in msg:
            raise ValueError(f"message {j} has no 'role'")
        role = msg["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"message {j} has invalid role {role!r}; expected one of {ROLES}")
        if "content" not in msg:
            raise ValueError(f"message {j} ({role}) has no 'content'")
        if not isinstance(msg["content"], str):
            raise ValueError(
                f"message {j} ({role}) content must be a string, "
                f"got {type(msg['content']).__name__}"
            )
        out.append(dict(msg))
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("conversation has no assistant message (nothing to train on)")
    return out


def parse_record(obj: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Split one jsonl record into ``(messages, metadata)``.

    ``obj`` must be a JSON object with a valid ``messages`` list (see
    :func:`validate_messages`); every other top-level field is metadata.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" not in obj:
        raise ValueError("missing field 'messages'")
    messages = validate_messages(obj["messages"])
    meta = {k: v for k, v in obj.items() if k != "messages"}
    return messages, meta


def _as_id_list(result: Any) -> list[int]:
    """Normalise an ``apply_chat_template(tokenize=True)`` result to a flat list of ints.

    transformers 5.x may return a ``BatchEncoding``/dict (``input_ids`` key), a
    tensor/array, or a (batched) nested list depending on the version and flags.
    """
    if isinstance(result, Mapping):  # BatchEncoding is a UserDict, hence a Mapping
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    result = list(result)
    if result and isinstance(result[0], (list, tuple)):
        if len(result) != 1:
            raise ValueError(f"chat template returned a batch of {len(result)} sequences")
        result = list(result[0])
    return [int(t) for t in result]


def _render(
    tokenizer: Any, messages: Sequence[dict[str, Any]], generation_prompt: bool
) -> list[int]:
    result = tokenizer.apply_chat_template(
        list(messages),
        tokenize=True,
        add_generation_prompt=generation_prompt,
        return_dict=False,
    )
    return _as_id_list(result)


def _require_prefix(longer: list[int], prefix: list[int], what: str) -> None:
    if len(longer) < len(prefix) or longer[: len(prefix)] != prefix:
        raise ValueError(
            f"chat template is not prefix-stable: {what} does not start with the previous "
            "rendering, so assistant tokens cannot be located by prefix differences"
        )


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id")
    return int(eos)


def _tokenize_with_template(
    tokenizer: Any, messages: list[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    eos = _eos_id(tokenizer)
    ids: list[int] = []
    mask: list[int] = []
    # The last rendering whose tokens are already in ``ids`` (inserted eos tokens aside).
    prev: list[int] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError(
                "with a chat template the first assistant message must follow at least one "
                "system/user message (an empty prefix cannot be rendered)"
            )
        prefix = _render(tokenizer, messages[:i], generation_prompt=True)
        _require_prefix(prefix, prev, f"the rendering of messages[:{i}] with a generation prompt")
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        _require_prefix(full, prefix, f"the rendering of messages[:{i + 1}]")
        context = prefix[len(prev) :]
        span = full[len(prefix) :]
        if not span:
            raise ValueError(f"chat template rendered assistant message {i} as zero tokens")
        ids += context
        mask += [0] * len(context)
        ids += span
        mask += [1] * len(span)
        if span[-1] != eos:
            ids.append(eos)
            mask.append(1)
        prev = full
    if messages[-1]["role"] != "assistant":
        full = _render(tokenizer, messages, generation_prompt=False)
        _require_prefix(full, prev, "the rendering of the whole conversation")
        tail = full[len(prev) :]
        ids += tail
        mask += [0] * len(tail)
    return ids, mask


def _single_token_id(tokenizer: Any, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    is_unk = unk is not None and tid == unk and token != getattr(tokenizer, "unk_token", None)
    if tid is None or is_unk:
        raise ValueError(
            f"tokenizer has no chat_template and no single token {token!r} "
            "for the built-in template"
        )
    return int(tid)


def _encode_content(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True)
    return [int(t) for t in enc["input_ids"]]


def _tokenize_builtin(
    tokenizer: Any, messages: list[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    eos = _eos_id(tokenizer)
    role_ids = {role: _single_token_id(tokenizer, tok) for role, tok in BUILTIN_ROLE_TOKENS.items()}
    end_id = _single_token_id(tokenizer, BUILTIN_END_TOKEN)
    ids: list[int] = []
    mask: list[int] = []
    for msg in messages:
        content = _encode_content(tokenizer, msg["content"])
        ids.append(role_ids[msg["role"]])
        mask.append(0)
        if msg["role"] == "assistant":
            turn = content + [end_id, eos]
            ids += turn
            mask += [1] * len(turn)
        else:
            turn = content + [end_id]
            ids += turn
            mask += [0] * len(turn)
    return ids, mask


def tokenize_conversation(tokenizer: Any, messages: Any) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a conversation into ``(ids int32, loss_mask uint8)`` of equal length.

    Uses the tokenizer's chat template when set, else the built-in template
    (see the module docstring for both, the eos and the bos rules).  Raises
    ``ValueError`` for invalid messages, a conversation without an assistant
    message, or a template that is not prefix-stable.
    """
    msgs = validate_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        ids, mask = _tokenize_with_template(tokenizer, msgs)
    else:
        ids, mask = _tokenize_builtin(tokenizer, msgs)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids.insert(0, int(bos))
        mask.insert(0, 0)
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)
