"""The record formats people already have, detected from their fields and turned into three kinds.

==============  =============================================================  ==========
format          fields                                                         kind
==============  =============================================================  ==========
``text``        ``text``                                                       text
``instruction`` ``prompt``, ``response`` (no template: ``prompt + response``)  instruction
``chat``        ``messages``: OpenAI chat messages (``system``/``developer``,   chat
                ``user``, ``assistant`` with ``content`` and/or ``tool_calls``,
                ``tool``; ``name``; ``content`` as a string or text parts)
``alpaca``      ``instruction``, ``output``; optional ``input`` (joined to the  chat
                instruction with a newline), ``system``, ``history``
                (``[[user, assistant], ...]`` before the instruction)
``sharegpt``    ``conversations``: ``[{from, value}]`` with ``human``, ``gpt``,  chat
                ``system``, ``function_call`` (an assistant turn),
                ``observation`` (a tool turn); optional top-level ``system``
``preference``  ``prompt``, ``chosen``, ``rejected``: each a string or          preference
                messages (for preference tuning)
==============  =============================================================  ==========

Chat-kind records are rendered by the tokenizer's chat template, with the loss on the assistant
turns only (see :mod:`leantune.data.encode`). Role names are normalised to the ones chat templates
know (``system``, ``user``, ``assistant``, ``tool``).

``data.columns`` renames fields before anything else (``{prompt: question, response: answer}``
reads ``question``/``answer`` as ``prompt``/``response``). A file holds one format: a record of
another one is an error that names its line, as is a record that matches none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from leantune.data.records import DataError

__all__ = [
    "COLUMN_FIELDS",
    "FORMATS",
    "KINDS",
    "apply_columns",
    "detect_record_format",
    "normalize",
    "prepare_records",
]

# format -> the fields that identify it, in the order detection tries them (most specific first)
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "sharegpt": ("conversations",),
    "chat": ("messages",),
    "preference": ("chosen", "rejected"),
    "alpaca": ("instruction", "output"),
    "instruction": ("prompt", "response"),
    "text": ("text",),
}
FORMATS = ("text", "instruction", "chat", "alpaca", "sharegpt", "preference")
KINDS = {"text": "text", "instruction": "instruction", "chat": "chat", "alpaca": "chat",
         "sharegpt": "chat", "preference": "preference"}  # fmt: skip
REQUIRED = {**_SIGNATURES, "preference": ("prompt", "chosen", "rejected")}
# every field name a format reads: the keys data.columns may map to
COLUMN_FIELDS = ("text", "prompt", "response", "messages", "instruction", "input", "output", "system",
                 "history", "conversations", "chosen", "rejected", "tools")  # fmt: skip

_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
               "tool": "tool"}  # fmt: skip
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "function_call": "assistant", "observation": "tool",
                   "tool": "tool"}  # fmt: skip


def apply_columns(record: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """``record`` with each ``columns[field]`` renamed to ``field`` (a new dict; absent ones skipped)."""
    if not columns:
        return record
    out = {k: v for k, v in record.items() if k not in columns.values()}
    for name, source in columns.items():
        if source in record:
            out[name] = record[source]
    return out


def detect_record_format(record: Mapping[str, Any]) -> str | None:
    """The first format whose identifying fields the record has (``None``: none)."""
    keys = {k for k, v in record.items() if v is not None}
    for fmt, fields in _SIGNATURES.items():
        if set(fields) <= keys:
            return fmt
    return None


def describe_formats() -> str:
    return "; ".join(f"{f}: {', '.join(REQUIRED[f])}" for f in FORMATS)


def normalize(record: Mapping[str, Any], fmt: str, loc: str) -> dict[str, Any]:
    """The record in its kind's canonical form: ``{"text"}``, ``{"prompt", "response"}``,
    ``{"messages"}`` or ``{"prompt", "chosen", "rejected"}`` (each a list of messages); other
    fields (e.g. ``task``) are kept.

    Raises:
        DataError: a required field is missing or has the wrong type, an unknown role, or a
            conversation with no assistant turn; the message starts with ``loc``.
    """
    if fmt not in KINDS:
        raise DataError(f"{loc}: unknown data format {fmt!r} (choose from auto, {', '.join(FORMATS)})")
    missing = [f for f in REQUIRED[fmt] if record.get(f) is None]
    if missing:
        raise DataError(
            f"{loc}: missing field {missing[0]!r} (format {fmt} needs {', '.join(REQUIRED[fmt])}; "
            f"found {', '.join(sorted(record)) or 'no fields'})"
        )
    extra = {k: v for k, v in record.items() if k == "task"}
    if fmt == "text":
        return {"text": _string(record, "text", loc), **extra}
    if fmt == "instruction":
        return {
            "prompt": _string(record, "prompt", loc),
            "response": _string(record, "response", loc),
            **extra,
        }
    if fmt == "chat":
        messages = _openai_messages(record["messages"], loc, "messages")
    elif fmt == "alpaca":
        messages = _alpaca_messages(record, loc)
    elif fmt == "sharegpt":
        messages = _sharegpt_messages(record, loc)
    else:
        return {**_preference(record, loc), **extra}
    _check_conversation(messages, loc)
    if record.get("tools") is not None:
        extra["tools"] = _tools(record["tools"], loc)
    return {"messages": messages, **extra}


def _tools(value: Any, loc: str) -> list[dict[str, Any]]:
    """Function definitions for the chat template's ``tools`` (sharegpt files keep them as JSON text)."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError:
            raise DataError(f"{loc}: 'tools' is a string but not JSON") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise DataError(f"{loc}: 'tools' must be a list of function definitions (objects)")
    return value


def _string(record: Mapping[str, Any], name: str, loc: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{loc}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _content(value: Any, loc: str) -> str:
    """A message's content: a string, or OpenAI content parts of which only text is trained on."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = {p.get("type") for p in value}
        if kinds - {"text"}:
            raise DataError(f"{loc}: content parts of type {sorted(map(str, kinds - {'text'}))} are not text")
        if all(isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
    raise DataError(f"{loc}: 'content' must be a string or a list of {{type: text, text}} parts")


def _openai_messages(messages: Any, loc: str, field: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{loc}: {field!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"{loc}: {field}[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where} must be an object with a string 'role'")
        role = _CHAT_ROLES.get(m["role"])
        if role is None:
            raise DataError(f"{where} has role {m['role']!r}; use system, user, assistant or tool")
        msg = {k: v for k, v in m.items() if k in ("name", "tool_calls", "tool_call_id")}
        if m.get("content") is None:
            if role != "assistant" or not m.get("tool_calls"):
                raise DataError(f"{where} has no 'content' (only an assistant message with tool_calls may)")
            msg["content"] = ""
        else:
            msg["content"] = _content(m["content"], where)
        out.append({"role": role, **msg})
    return out


def _alpaca_messages(record: Mapping[str, Any], loc: str) -> list[dict[str, Any]]:
    messages = []
    if record.get("system") is not None:
        messages.append({"role": "system", "content": _string(record, "system", loc)})
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
        for turn in history
    ):
        raise DataError(f"{loc}: 'history' must be a list of [user, assistant] string pairs")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    query = _string(record, "instruction", loc)
    if record.get("input") is not None:
        extra = _string(record, "input", loc)
        query = f"{query}\n{extra}" if extra else query
    messages += [{"role": "user", "content": query},
                 {"role": "assistant", "content": _string(record, "output", loc)}]  # fmt: skip
    return messages


def _sharegpt_messages(record: Mapping[str, Any], loc: str) -> list[dict[str, Any]]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{loc}: 'conversations' must be a non-empty list of {{from, value}} objects")
    messages = []
    if record.get("system") is not None:
        messages.append({"role": "system", "content": _string(record, "system", loc)})
    for i, t in enumerate(turns):
        where = f"{loc}: conversations[{i}]"
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("from"), str)
            or not isinstance(t.get("value"), str)
        ):
            raise DataError(f"{where} must be an object with string 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(t["from"])
        if role is None:
            known = "human, gpt, system, function_call, observation"
            raise DataError(f"{where} is from {t['from']!r}; use {known}")
        messages.append({"role": role, "content": t["value"]})
    return messages


def _as_messages(value: Any, loc: str, field: str, role: str) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _openai_messages(value, loc, field)


def _preference(record: Mapping[str, Any], loc: str) -> dict[str, Any]:
    prompt = _as_messages(record["prompt"], loc, "prompt", "user")
    out: dict[str, Any] = {"prompt": prompt}
    if all(isinstance(record[k], str) for k in ("prompt", "chosen", "rejected")):
        # TRL's "standard" format: plain text, trained as prompt + completion like an instruction
        # record (an SFT stage on instruction records and a DPO stage on these see the same text);
        # messages go through the chat template
        out["plain"] = True
    for name in ("chosen", "rejected"):
        reply = _as_messages(record[name], loc, name, "assistant")
        if not any(m["role"] == "assistant" for m in reply):
            raise DataError(f"{loc}: {name!r} has no assistant message")
        out[name] = reply
    return out


def _check_conversation(messages: list[dict[str, Any]], loc: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{loc}: no assistant message, so nothing to learn from this conversation")


def prepare_records(
    records: list[dict[str, Any]],
    where: list[str],
    fmt: str = "auto",
    columns: Mapping[str, str] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Rename (``columns``), detect (``fmt="auto"``: from the first record) and normalise records.

    Returns:
        The canonical records (see :func:`normalize`) and the format name.

    Raises:
        DataError: naming the record (file and line) that matches no format, one of another format
            than the first record's, or a malformed one.
    """
    renamed = [apply_columns(r, columns or {}) for r in records]
    auto = fmt == "auto"
    if auto and renamed:
        found = detect_record_format(renamed[0])
        if found is None:
            raise DataError(
                f"{where[0]}: cannot tell the data format from the fields {sorted(renamed[0])}; expected "
                f"one of ({describe_formats()}), or set data.format (data.columns renames fields)"
            )
        fmt = found
    out = []
    for rec, loc in zip(renamed, where):
        if auto:
            found = detect_record_format(rec)
            if found is not None and found != fmt:
                raise DataError(
                    f"{loc}: the fields {sorted(rec)} are those of {found} records, but the first "
                    f"record ({where[0]}) is {fmt}: one format per file"
                )  # (a record of no format fails in normalize, naming the field it lacks)
        out.append(normalize(rec, fmt, loc))
    return out, fmt
