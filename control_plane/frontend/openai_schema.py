"""OpenAI request bodies -> ``GenerationInput``, and ``Delta``s -> OpenAI response objects.

Chat template (simple and documented, for models without their own): each message becomes ``<|{role}|>\\n{content}\\n``
and the prompt ends with ``<|assistant|>\\n`` so the model answers as the assistant. A message's content may be a string
or a list of ``{"type": "text", "text": ...}`` parts (concatenated).

Bodies are checked before anything expensive happens: ``load_json`` refuses non-finite numbers, nesting deeper than
``MAX_JSON_DEPTH`` and strings that are not valid Unicode (lone surrogates); ``parse_request`` checks every field's JSON
type (booleans must be JSON booleans) and that integers fit their protobuf fields. Tokenising happens later, in
``Frontend.submit``, after the size and range checks.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pyllumnix.control_plane.frontend.core import (
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    GenerationInput,
    check_text,
)
from pyllumnix.control_plane.frontend.errors import InvalidRequestError
from pyllumnix.control_plane.frontend.tokenizer import Tokenizer
from pyllumnix.infra import wire
from pyllumnix.infra.vocabulary import Priority
from pyllumnix.protos.llumnix.v1 import common_pb2

# The priorities an HTTP client may name (the vocabulary's, UNSPECIFIED aside: the API takes names only).
PRIORITIES: dict[str, common_pb2.Priority.ValueType] = {
    p.name.lower(): wire.priority_to_pb(p) for p in Priority if p is not Priority.UNSPECIFIED
}
# Fields whose non-default values this server cannot honour: rejected rather than silently ignored.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),  # without tools, "auto" and "none" both mean plain text
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),  # JSON mode / schemas: the client would get free text
    "min_tokens": (None, 0),
}


def _is_default(value: object, allowed: tuple[Any, ...]) -> bool:
    """``value`` is one of ``allowed`` by type as well as value: ``0 == False`` and ``True == 1`` in Python, but
    ``"logprobs": 0`` asks for the sampled token's logprob and ``"best_of": true`` is no count."""
    return any(value == a and type(value) is type(a) for a in allowed)


MAX_JSON_DEPTH = 32
# A JSON escape of a UTF-16 surrogate: the only way a lone surrogate gets into a parsed body (UTF-8 cannot carry one).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a valid JSON number")


def load_json(raw: bytes) -> object:
    """Parses a request body; raises InvalidRequestError for anything but well-formed, finite, valid-Unicode JSON
    nested at most MAX_JSON_DEPTH deep (deeper bodies would otherwise end in RecursionError somewhere)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError as exc:
        raise InvalidRequestError(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep") from exc
    except ValueError as exc:  # includes UnicodeDecodeError
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from exc
    # Walking the parsed tree is Python work: skip it when the raw bytes already prove it unnecessary (too few
    # brackets to nest past the limit, no surrogate escape), which is the common case and the large-body case.
    texts = _SURROGATE_ESCAPE.search(raw) is not None
    if texts or raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        _check_tree(body, texts=texts)
    return body


def _check_tree(body: object, *, texts: bool = True) -> None:
    """Depth of every value and (``texts``) validity of every string, iteratively (the check must not recurse)."""
    stack: list[tuple[object, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if texts:
                check_text(value, "body")
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequestError(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep")
            if isinstance(value, dict):
                for key, item in value.items():
                    check_text(key, "body")
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


@dataclass(frozen=True)
class ParsedRequest:
    inp: GenerationInput
    stream: bool
    include_usage: bool
    chat: bool


def parse_priority(value: object, param: str) -> common_pb2.Priority.ValueType:
    if not isinstance(value, str) or value.lower() not in PRIORITIES:
        raise InvalidRequestError(f"{param} must be one of {sorted(PRIORITIES)}, got {value!r}", param=param)
    return PRIORITIES[value.lower()]


def _number(body: Mapping[str, Any], key: str, default: float) -> float:
    """A finite JSON number (ints too); range checks of sampling values are ``core.check_sampling``'s."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{key} must be a number", param=key)
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise InvalidRequestError(f"{key} must be a finite number", param=key)
    return number


def _integer(body: Mapping[str, Any], key: str, default: int, bounds: tuple[int, int] = INT32) -> int:
    """A JSON integer that fits its protobuf field (``bounds``: int32 unless said otherwise)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{key} must be an integer", param=key)
    if not bounds[0] <= value <= bounds[1]:
        raise InvalidRequestError(f"{key} must be in [{bounds[0]}, {bounds[1]}], got {value}", param=key)
    return value


def _boolean(body: Mapping[str, Any], key: str, default: bool = False) -> bool:
    """A JSON boolean: ``"false"`` (a non-empty string) must not silently read as true."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{key} must be a boolean (true or false), got {value!r:.40}", param=key)
    return value


def _stops(value: object) -> list[str]:
    """Stop strings; their number and length limits are ``core.check_sampling``'s (shared with gRPC)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:  # before any per-item work
        raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}", param="stop")
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    raise InvalidRequestError("stop must be a string or a list of strings", param="stop")


def _token_ids(value: object, param: str) -> list[int]:
    """A list of token ids (vLLM's ``stop_token_ids`` extension, honoured as the gRPC API honours it); their count
    and vocabulary range are ``core.check_sampling``'s, after the per-item type check here."""
    if value is None:
        return []
    if isinstance(value, list) and len(value) > MAX_STOP_TOKEN_IDS:  # before any per-item work
        raise InvalidRequestError(f"at most {MAX_STOP_TOKEN_IDS} {param}, got {len(value)}", param=param)
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidRequestError(f"{param} must be a list of token ids (integers)", param=param)
    if not all(INT32[0] <= t <= INT32[1] for t in value):
        raise InvalidRequestError(f"{param} must fit 32 bits", param=param)
    return list(value)


def _completion_prompt(value: object) -> str | list[int]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if not all(INT32[0] <= t <= INT32[1] for t in value):
            raise InvalidRequestError("token ids must fit 32 bits", param="prompt")
        return list(value)
    if isinstance(value, list) and len(value) == 1:
        return _completion_prompt(value[0])
    if isinstance(value, list) and len(value) > 1:
        raise InvalidRequestError("only one prompt per request is supported", param="prompt")
    raise InvalidRequestError("prompt must be a string, a list of token ids, or a list of one of those", param="prompt")


def _content(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError("only text content parts are supported", param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequestError("content must be a string or a list of text parts", param=f"messages[{index}].content")


def render_chat(messages: object) -> str:
    """The chat template described in the module docstring."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    lines = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequestError("each message needs a string role", param=f"messages[{i}]")
        lines.append(f"<|{message['role']}|>\n{_content(message, i)}\n")
    return "".join(lines) + "<|assistant|>\n"


def parse_request(
    body: object,
    *,
    chat: bool,
    tokenizer: Tokenizer,
    max_model_len: int,
    header_priority: str | None = None,
    request_id: str = "",
) -> ParsedRequest:
    """Validates an OpenAI body. An omitted max_tokens means "up to the model's maximum length"."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    for key, allowed in _UNSUPPORTED.items():
        if key in body and not _is_default(body[key], allowed):
            raise InvalidRequestError(f"{key} is not supported by this server", param=key)
    if _integer(body, "n", 1, INT64) != 1:
        raise InvalidRequestError("only n=1 is supported", param="n")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise InvalidRequestError("model must be a string", param="model")
    prompt: str | list[int] = render_chat(body.get("messages")) if chat else _completion_prompt(body.get("prompt"))
    if chat:  # validated above; the model's own chat template wins where the tokenizer has one
        own = getattr(tokenizer, "render_chat", None)
        prompt = (own(body["messages"]) if own is not None else None) or prompt
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    if key != "max_tokens":
        _integer(body, "max_tokens", 0)  # superseded, but a malformed one is still an error
    # Omitted: 0 here, filled in by the frontend from the prompt's token count ("up to the model's maximum length").
    max_tokens = _integer(body, key, 0)
    if body.get(key) is not None and max_tokens <= 0:
        raise InvalidRequestError(f"{key} must be positive, got {max_tokens}", param=key)
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    repetition_penalty = _number(body, "repetition_penalty", 0.0)
    if body.get("repetition_penalty") is not None and repetition_penalty <= 0:
        raise InvalidRequestError(
            f"repetition_penalty must be positive, got {repetition_penalty}", param="repetition_penalty"
        )
    temperature = _number(body, "temperature", 1.0)
    # float32 on the wire: check the range here, where 1e300 is still 1e300 and not inf.
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidRequestError(
            f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}", param="temperature"
        )
    # float32 on the wire: check the range here, where 1e300 is still 1e300 and not inf.
    if abs(repetition_penalty) > 1e6:
        raise InvalidRequestError(
            f"repetition_penalty is out of range: {repetition_penalty}", param="repetition_penalty"
        )
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=_integer(body, "top_k", 0),
        stop=_stops(body.get("stop")),
        ignore_eos=_boolean(body, "ignore_eos"),
        presence_penalty=_bounded(body, "presence_penalty"),
        frequency_penalty=_bounded(body, "frequency_penalty"),
        repetition_penalty=repetition_penalty,
        stop_token_ids=_token_ids(body.get("stop_token_ids"), "stop_token_ids"),
    )
    if body.get("seed") is not None:
        sampling.seed = _integer(body, "seed", 0, INT64)
    priority = common_pb2.PRIORITY_NORMAL
    if header_priority is not None:
        priority = parse_priority(header_priority, "X-Llumnix-Priority")
    if body.get("priority") is not None:
        priority = parse_priority(body["priority"], "priority")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise InvalidRequestError("stream_options must be an object", param="stream_options")
    include_usage = _boolean(options, "include_usage")
    if body.get("stream_options") is not None and not stream:  # OpenAI's rule: options of a stream there is not
        raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
    inp = GenerationInput(prompt, sampling, priority, request_id, model, fill_max_tokens=max_tokens == 0)
    return ParsedRequest(inp, stream, include_usage, chat)


def _bounded(body: Mapping[str, Any], key: str) -> float:
    """A penalty: finite and small enough for float32 (its real range is checked by ``core.check_sampling``)."""
    value = _number(body, key, 0.0)
    if abs(value) > 1e6:
        raise InvalidRequestError(f"{key} is out of range: {value}", param=key)
    return value


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(request_id: str, model: str, *, chat: bool, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
    }


def choice(text: str, finish_reason: str | None, *, chat: bool, chunk: bool, first: bool = False) -> dict[str, Any]:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if chunk:
        delta: dict[str, str] = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    message = {"role": "assistant", "content": text}
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}


def finish_reason_name(reason: int, finished: bool) -> str | None:
    return (wire.finish_label(reason) or "stop") if finished else None


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
