"""The frontend's Hugging Face tokenizer adapter on the tiny model's byte-level BPE tokenizer (built locally, offline):
incremental deltas add up to the full decode with nothing repeated or lost, also when a multi-byte UTF-8 character is
split across tokens, whatever the push sizes."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (make vllm installs it)")
pytest.importorskip("torch", reason="torch is not installed (make vllm installs it)")

from pyllumnix.control_plane.frontend.main import FrontendOptions, make_tokenizer
from pyllumnix.control_plane.frontend.requests import TrackedRequest
from pyllumnix.control_plane.frontend.tokenizer import HfTokenizer
from pyllumnix.protos.llumnix.v1 import common_pb2

TEXT = "the quick brown fox — héllo 日本語 🦊 done, naïve café"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pyllumnix.tools.tiny_model import build_tiny_model

    path = os.environ.get("LLUMNIX_TINY_MODEL")
    return build_tiny_model(path if path else tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> HfTokenizer:
    return HfTokenizer(model_dir)


def deltas(tok: HfTokenizer, prompt: Sequence[int], output: Sequence[int], chunk: int) -> list[str]:
    d = tok.detokenizer(prompt)
    parts = [d.add(output[i : i + chunk]) for i in range(0, len(output), chunk)]
    return [*parts, d.flush()]


def test_basics(tok: HfTokenizer) -> None:
    assert tok.vocab_size == 512
    assert tok.eos_token_id == 2
    ids = tok.encode(TEXT)
    assert ids and all(0 <= t < tok.vocab_size for t in ids)
    assert tok.decode(ids) == TEXT
    assert tok.decode([*ids, 2]) == TEXT  # special tokens (EOS) never show up as text


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("prompt", ["", "the", "prompt with café 日"])
def test_deltas_add_up_to_the_full_decode(tok: HfTokenizer, chunk: int, prompt: str) -> None:
    output = tok.encode(TEXT)
    parts = deltas(tok, tok.encode(prompt), output, chunk)
    assert "".join(parts) == tok.decode(output) == TEXT
    assert all("\ufffd" not in p for p in parts)


def test_multibyte_character_split_across_tokens(tok: HfTokenizer) -> None:
    output = tok.encode("a 🦊 b")
    # The fox's four UTF-8 bytes are separate byte-level tokens: each alone is not valid text.
    assert len(output) >= 5 and any("\ufffd" in tok.decode([t]) for t in output)
    d = tok.detokenizer(tok.encode("x"))
    parts = [d.add([t]) for t in output]
    assert "".join(parts) + d.flush() == "a 🦊 b"
    assert "🦊" in parts  # emitted whole, once, by the token that completed it
    assert parts.count("") >= 3  # held back while incomplete


def test_leading_space_depends_on_the_prompt(tok: HfTokenizer) -> None:
    output = tok.encode(" quick brown")
    assert "".join(deltas(tok, tok.encode("the"), output, 1)) == " quick brown"


def test_flush_emits_an_incomplete_tail(tok: HfTokenizer) -> None:
    fox = tok.encode("🦊")
    output = [*tok.encode("ok "), *fox[:2]]  # the stream ends half-way through a character
    d = tok.detokenizer([])
    held = d.add(output)
    tail = d.flush()
    assert held == "ok " and tail and set(tail) == {"\ufffd"}
    assert held + tail == tok.decode(output)
    assert d.flush() == ""


def test_long_stream_matches_decode(tok: HfTokenizer) -> None:
    output = tok.encode((TEXT + " ") * 40)
    parts = deltas(tok, [], output, 1)
    assert "".join(parts) == tok.decode(output)


def test_tracked_request_with_duplicates_and_migration_resends(tok: HfTokenizer) -> None:
    """Through the frontend's per-request state: a re-sent range (a migration's source and destination overlap) is
    dropped before detokenization, so the client's text is the decode of the token stream."""
    output = tok.encode(TEXT)
    req = TrackedRequest(request_id="r", prompt_token_ids=[5, 6], detokenizer=tok.detokenizer([5, 6]))
    mid = len(output) // 2
    req.accept(common_pb2.RequestOutput(request_id="r", token_ids=output[:mid], first_token_index=0), "a")
    req.accept(common_pb2.RequestOutput(request_id="r", token_ids=output[mid - 3 :], first_token_index=mid - 3), "b")
    req.accept(
        common_pb2.RequestOutput(
            request_id="r",
            first_token_index=len(output),
            finished=True,
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
        ),
        "b",
    )
    assert req.finished and req.text == TEXT


def test_chat_template(tok: HfTokenizer, model_dir: Path, tmp_path: Path) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert not tok.has_chat_template and tok.render_chat(messages) is None
    with_template = tmp_path / "templated"
    shutil.copytree(model_dir, with_template)
    config_path = with_template / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    config_path.write_text(json.dumps(config))
    templated = HfTokenizer(with_template)
    rendered = templated.render_chat(messages)
    assert rendered == "<s>[user] hi\n[assistant] "
    ids = templated.encode(rendered)
    assert ids.count(templated.encode("<s>")[0]) == 1  # BOS from the template, not added twice


def test_frontend_option(model_dir: Path) -> None:
    assert isinstance(make_tokenizer(FrontendOptions(tokenizer="hf", model=str(model_dir))), HfTokenizer)
    explicit = FrontendOptions(tokenizer="hf", model="served-name", tokenizer_path=str(model_dir))
    assert isinstance(make_tokenizer(explicit), HfTokenizer)


def test_chat_template_that_rejects_the_messages_is_a_400(model_dir: Path, tmp_path: Path) -> None:
    """Llama-2/Mistral-style templates ``raise_exception`` for roles that do not alternate: the client's bad input
    (InvalidRequestError -> HTTP 400 naming the reason), not jinja2's TemplateError escaping as a 500 (the old code)."""
    from pyllumnix.control_plane.frontend.errors import InvalidRequestError
    from pyllumnix.control_plane.frontend.openai_schema import parse_request

    strict = tmp_path / "strict"
    shutil.copytree(model_dir, strict)
    config_path = strict / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    config_path.write_text(json.dumps(config))
    templated = HfTokenizer(strict)
    assert templated.render_chat([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    twice = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    with pytest.raises(InvalidRequestError, match="roles must alternate") as caught:
        templated.render_chat(twice)
    assert caught.value.param == "messages" and caught.value.http_status == 400
    with pytest.raises(InvalidRequestError, match="chat template rejected"):
        parse_request({"messages": twice}, chat=True, tokenizer=templated, max_model_len=512)
