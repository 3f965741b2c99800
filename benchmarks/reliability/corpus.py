"""The bad-input corpus: requests an attacker or a careless client sends. Each must get a 4xx in
OpenAI's error shape, and none may reset the connection."""

from __future__ import annotations

import json

CHAT = [{"role": "user", "content": "hi"}]


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def cases() -> list[tuple[str, str, str, bytes]]:
    """(name, method, path, body) of every case."""
    s = b'"\\ud800"'  # a lone UTF-16 surrogate, valid JSON
    out = [
        ("priority 10**400 (chat)", "POST", "/v1/chat/completions", _j({"messages": CHAT, "priority": 10**400})),
        ("priority 10**400 (completions)", "POST", "/v1/completions", _j({"prompt": "hi", "priority": 10**400})),
        ("priority -10**400 stream", "POST", "/v1/chat/completions", _j({"messages": CHAT, "priority": -(10**400), "stream": True})),
        ("seed 2**64-1", "POST", "/v1/completions", _j({"prompt": "hi", "seed": 2**64 - 1})),
        ("seed 2**70", "POST", "/v1/chat/completions", _j({"messages": CHAT, "seed": 2**70})),
        ("stop_token_ids [2**70]", "POST", "/v1/completions", _j({"prompt": "hi", "stop_token_ids": [2**70]})),
        ("top_k 2**70", "POST", "/v1/completions", _j({"prompt": "hi", "top_k": 2**70})),
        ("max_tokens 2**70", "POST", "/v1/completions", _j({"prompt": "hi", "max_tokens": 2**70})),
        ("n 10**9", "POST", "/v1/completions", _j({"prompt": "hi", "n": 10**9})),
        ("temperature NaN", "POST", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}'),
        ("top_p Infinity", "POST", "/v1/completions", b'{"prompt": "hi", "top_p": Infinity}'),
        ("temperature 1e400", "POST", "/v1/completions", b'{"prompt": "hi", "temperature": 1e400}'),
        ("prompt [false]", "POST", "/v1/completions", _j({"prompt": [False]})),
        ("prompt [-1]", "POST", "/v1/completions", _j({"prompt": [-1]})),
        ("prompt [10**30]", "POST", "/v1/completions", _j({"prompt": [10**30]})),
        ("prompt [[]]", "POST", "/v1/completions", _j({"prompt": [[]]})),
        ("prompt []", "POST", "/v1/completions", _j({"prompt": []})),
        ("prompt {}", "POST", "/v1/completions", _j({"prompt": {}})),
        ("surrogate chat content", "POST", "/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": %s}]}' % s),
        ("surrogate content part", "POST", "/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}' % s),
        ("surrogate prompt", "POST", "/v1/completions", b'{"prompt": %s}' % s),
        ("surrogate model", "POST", "/v1/completions", b'{"prompt": "hi", "model": %s}' % s),
        ("surrogate stop", "POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stop": %s}' % s),
        ("surrogate tokenize", "POST", "/tokenize", b'{"prompt": %s}' % s),
        ("surrogate key", "POST", "/v1/completions", b'{"prompt": "hi", %s: 1}' % s),
        ("content part text 123", "POST", "/v1/chat/completions",
         _j({"messages": [{"role": "user", "content": [{"type": "text", "text": 123}]}]})),
        ("content part text null", "POST", "/v1/chat/completions",
         _j({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]})),
        ("content part text list", "POST", "/v1/chat/completions",
         _j({"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]})),
        ("content part without type", "POST", "/v1/chat/completions",
         _j({"messages": [{"role": "user", "content": [{"text": "a"}]}]})),
        ("image part", "POST", "/v1/chat/completions",
         _j({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})),
        ("role wizard", "POST", "/v1/chat/completions", _j({"messages": [{"role": "wizard", "content": "hi"}]})),
        ("messages []", "POST", "/v1/chat/completions", _j({"messages": []})),
        ("messages null", "POST", "/v1/chat/completions", _j({"messages": None})),
        ("tokenize messages []", "POST", "/tokenize", _j({"messages": []})),
        ("tokenize nothing", "POST", "/tokenize", _j({})),
        ("detokenize [true]", "POST", "/detokenize", _j({"tokens": [True]})),
        ("detokenize [10**30]", "POST", "/detokenize", _j({"tokens": [10**30]})),
        ("invalid UTF-8 body", "POST", "/v1/completions", b'{"prompt": "\xc3\x28"}'),
        ("truncated JSON", "POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"'),
        ("empty body", "POST", "/v1/completions", b""),
        ("JSON array body", "POST", "/v1/completions", b"[1, 2]"),
        ("JSON null body", "POST", "/v1/completions", b"null"),
        ("deeply nested", "POST", "/v1/completions", b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("stream 'yes'", "POST", "/v1/completions", _j({"prompt": "hi", "stream": "yes"})),
        ("stream_options wrong", "POST", "/v1/completions", _j({"prompt": "hi", "stream": True, "stream_options": 5})),
        ("65 stop strings", "POST", "/v1/completions", _j({"prompt": "hi", "stop": ["x"] * 65})),
        ("empty stop string", "POST", "/v1/completions", _j({"prompt": "hi", "stop": [""]})),
        ("logprobs 10**9", "POST", "/v1/completions", _j({"prompt": "hi", "logprobs": 10**9})),
        ("top_logprobs -1", "POST", "/v1/chat/completions", _j({"messages": CHAT, "logprobs": True, "top_logprobs": -1})),
        ("prompt over the context", "POST", "/v1/completions", _j({"prompt": "hello " * 5000})),
        ("3 MB prompt", "POST", "/v1/completions", _j({"prompt": "a" * (3 << 20)})),
        ("unknown model", "POST", "/v1/chat/completions", _j({"messages": CHAT, "model": "gpt-17"})),
        ("GET on a POST route", "GET", "/v1/completions", b""),
        ("unknown path", "GET", "/v1/nothing", b""),
        ("DELETE models", "DELETE", "/v1/models", b""),
    ]
    return out
