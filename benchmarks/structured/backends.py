"""Compare llguidance and xgrammar on this CPU: compile time and per-token mask time, SmolLM2 tokenizer.

xgrammar is not a dependency of Shoal: `pip install --no-deps xgrammar apache-tvm-ffi` to run this."""
import json, time, statistics
import torch
from shoal.model.loader import default_model_path, load_tokenizer

tok = load_tokenizer(default_model_path())
V = 49152
schema = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "role": {"enum": ["admin", "user", "guest"]}},
    "required": ["name", "age", "address", "role"], "additionalProperties": False}
answer = json.dumps({"name": "Alice Smith", "age": 31, "tags": ["a", "bb"], "address": {"city": "Paris", "zip": "75001"}, "role": "admin"})
ids = tok.encode(answer, add_special_tokens=False)
print("answer tokens", len(ids))

def med(xs): return statistics.median(xs) * 1e3

# llguidance
import llguidance, llguidance.hf, llguidance.torch as lt
t0 = time.perf_counter(); lltok = llguidance.hf.from_tokenizer(tok, n_vocab=V); t_tok = time.perf_counter() - t0
g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
comp = []
for i in range(5):
    t0 = time.perf_counter(); m = llguidance.LLMatcher(lltok, g); comp.append(time.perf_counter() - t0)
mask = lt.allocate_token_bitmask(1, V)
steps = []
for t in ids:
    t0 = time.perf_counter(); lt.fill_next_token_bitmask(m, mask, 0); steps.append(time.perf_counter() - t0)
    assert m.consume_token(t), m.get_error()
print(f"llguidance: tokenizer {t_tok*1e3:.0f} ms, matcher first {comp[0]*1e3:.2f} ms, median {med(comp):.2f} ms, mask/token median {med(steps):.3f} ms, max {max(steps)*1e3:.2f} ms")

# xgrammar
import xgrammar as xgr
t0 = time.perf_counter(); info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V); t_tok = time.perf_counter() - t0
comp = []
for i in range(5):
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t0 = time.perf_counter(); cg = compiler.compile_json_schema(json.dumps(schema)); comp.append(time.perf_counter() - t0)
m = xgr.GrammarMatcher(cg)
bm = xgr.allocate_token_bitmask(1, V)
steps = []
for t in ids:
    t0 = time.perf_counter(); m.fill_next_token_bitmask(bm, 0); steps.append(time.perf_counter() - t0)
    assert m.accept_token(t)
print(f"xgrammar: tokenizer {t_tok*1e3:.0f} ms, compile first {comp[0]*1e3:.2f} ms, median {med(comp):.2f} ms, mask/token median {med(steps):.3f} ms, max {max(steps)*1e3:.2f} ms")
