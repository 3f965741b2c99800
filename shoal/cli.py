"""The ``shoal`` command."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Optional

import typer

from shoal import logs
from shoal.extras import require

app = typer.Typer(help="Shoal: serve, benchmark and simulate LLMs.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

ModelOpt = typer.Option(None, "--model", help="GGUF file or Hugging Face folder (default: built-in SmolLM2-135M-Instruct)")
# The choices of options that take one (typer shows and checks them); tests/test_cli.py checks each
# against the tuple its module keeps, so the two cannot drift apart.
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Dispatch = Literal["predicted_latency", "round_robin", "least_load", "prefix_aware", "session_affinity"]
Migration = Literal["llumnix", "llumnix_ungated", "none"]
TokenBudget = Literal["fixed", "slo"]
Admission = Literal["fcfs", "deadline"]
SchedulingPolicy = Literal["fcfs", "priority", "vtc"]
ProgramScheduling = Literal["continuum", "none"]
PreemptionMode = Literal["auto", "swap", "recompute"]
ToolCallParser = Literal["hermes", "llama3_json"]
ToolPrompt = Literal["auto", "template", "system"]
AgentPreset = Literal["swe", "bfcl"]

DtypeOpt = typer.Option("auto", "--dtype", help="bfloat16 where the device computes it natively, else float32 (auto)")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda")
ThreadsOpt = typer.Option(None, "--num-threads", help="Torch CPU threads (default: all cores; fewer when other work shares the CPU)")


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input while setting up (a missing or corrupt model file, an unknown dtype or device, an
    invalid engine option) ends the command with one line on stderr and exit code 2, not a traceback."""
    from shoal.extras import MissingExtra
    from shoal.model.loader import ModelLoadError

    try:
        yield
    except (ValueError, ModelLoadError, MissingExtra) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from exc


def parse_json_option(name: str, value: str | None):
    """The JSON value of option ``name`` (None if not given); ValueError naming the option if malformed."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None


ProgramSchedulingOpt = typer.Option("continuum", "--program-scheduling", help="Agent programs' turns (requests sharing a session_id) scheduled program-first with their KV kept between turns, or request-level FCFS")
ProgramConfigOpt = typer.Option(None, "--program-config", help='JSON tuning of --program-scheduling continuum, e.g. \'{"max_pinned_fraction": 0.5, "aging_s": 10}\' (see the README)')


def _read_config(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """``--config FILE``: its values become the command's defaults (the command line and ``SHOAL_*``
    environment variables still win)."""
    if value is not None:
        from shoal.config_file import option_defaults

        names = {p.name for p in ctx.command.params if p.name and p.name != "config_file"}
        try:
            values = option_defaults(value, names)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--config") from None
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


ConfigOpt = typer.Option(None, "--config", callback=_read_config, is_eager=True,
                         help="YAML (or .json) file of options, e.g. 'max_num_seqs: 32' (the command line and SHOAL_SERVE_* variables override it)")


def _positive(value: Optional[float]) -> Optional[float]:
    if value is not None and not 0 < value < float("inf"):
        raise typer.BadParameter(f"must be a positive number, got {value}")
    return value


def program_config(scheduling: str, options: str | None):
    """The :class:`ProgramConfig` of ``--program-scheduling`` and ``--program-config``."""
    from shoal.engine.programs import ProgramConfig

    from dataclasses import replace

    return replace(ProgramConfig.from_dict(parse_json_option("--program-config", options) or {}), scheduling=scheduling)


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message"),
    model: Optional[str] = ModelOpt,
    max_tokens: int = typer.Option(128, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    system: Optional[str] = typer.Option(None, "--system", help="Optional system message"),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template"),
    dtype: Dtype = DtypeOpt,
    device: str = DeviceOpt,
    num_threads: Optional[int] = ThreadsOpt,
) -> None:
    """Answer one prompt with the chat template applied and print the answer."""
    from shoal import LLM, SamplingParams
    from shoal.progress import bar

    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    with user_errors(), bar("loading the model"):
        llm = LLM(model=model, dtype=dtype, device=device, num_threads=num_threads)
    if raw:
        out = llm.generate(prompt, params)[0]
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        out = llm.chat(messages, params)[0]
    typer.echo(out.text)


@app.command()
def serve(
    ctx: typer.Context,
    config_file: Optional[Path] = ConfigOpt,
    model: Optional[str] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Name clients use (default: the model file's name)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SHOAL_API_KEY", help="Require this bearer token on /v1, /tokenize, /detokenize, /metrics"),
    keys: Optional[Path] = typer.Option(None, "--keys", help="YAML / JSON keys file: API keys, each naming a tenant (weight, priority_ceiling)"),
    open_metrics: bool = typer.Option(False, "--open-metrics", help="Serve /metrics and /dashboard/state without a key (a scraper on a private network)"),
    max_waiting: int = typer.Option(1024, "--max-waiting", help="Answer 429 when this many requests wait (size it to the clients' concurrency less --max-num-seqs)"),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs"),
    max_num_batched_tokens: int = typer.Option(512, "--max-num-batched-tokens"),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len"),
    kv_cache_gb: Optional[float] = typer.Option(None, "--kv-cache-gb"),
    block_size: int = typer.Option(16, "--block-size", min=1, help="Tokens per KV block"),
    swap_space: float = typer.Option(1.0, "--swap-space", min=0.0, help="GiB of host memory for preempted requests' KV"),
    enable_prefix_caching: bool = typer.Option(True, "--enable-prefix-caching/--no-enable-prefix-caching", help="Reuse the KV of prompt prefixes already computed"),
    preemption_mode: PreemptionMode = typer.Option("auto", "--preemption-mode", help="How a preempted request gives up its KV: swap to host memory, recompute later, or the cheaper by the cost model (auto)"),
    priority_aging_s: Optional[float] = typer.Option(None, "--priority-aging-s", min=0.0, help="A waiting request gains one priority level per this many seconds (default: no aging)"),
    kv_tier_gb: float = typer.Option(0.0, "--kv-tier-gb", min=0.0, help="A second KV tier of this size: prefix blocks evicted from the KV cache are kept there and loaded back on a prefix hit (0: none)"),
    kv_tier_path: Optional[Path] = typer.Option(None, "--kv-tier-path", help="Keep the second tier in this file on local disk (created or overwritten) instead of host memory"),
    instances: int = typer.Option(1, "--instances", help="Engine instances; >1 runs them as Ray actors"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join an existing Ray cluster (implies the cluster mode)"),
    dispatch: Dispatch = typer.Option("predicted_latency", "--dispatch", help="How the cluster picks an instance for a request"),
    migration: Migration = typer.Option("llumnix", "--migration", help="Live migration between instances: llumnix keeps Llumnix's moves where they are predicted to raise SLO attainment; llumnix_ungated makes them all"),
    roles: Optional[str] = typer.Option(None, "--roles", help="Comma-separated per-instance roles: both | prefill | decode"),
    slo_ttft_ms: float = typer.Option(1000.0, "--slo-ttft-ms", help="TTFT objective of requests that bring none (dispatch, deadline admission)"),
    slo_tpot_ms: float = typer.Option(100.0, "--slo-tpot-ms", help="TPOT objective (dispatch; the step time limit of --token-budget slo)"),
    token_budget: TokenBudget = typer.Option("fixed", "--token-budget", help="slo: also cut prefill chunks so a step with decodes stays within the TPOT SLO"),
    admission: Admission = typer.Option("fcfs", "--admission", help="deadline: at equal priority, admit requests within the TTFT SLO first"),
    scheduling_policy: SchedulingPolicy = typer.Option("vtc", "--scheduling-policy", help="Admission and preemption order (vtc: priority, then weighted fair share between tenants)"),
    fair_first_token: bool = typer.Option(True, "--fair-first-token/--no-fair-first-token", help="Under vtc: a tenant behind in fair share gets its new prompts' first tokens in a step of their own while the tenants ahead of it wait one step"),
    fair_prefill_tokens: Optional[int] = typer.Option(None, "--fair-prefill-tokens", min=1, help="Under vtc: while a tenant behind in fair share has work, the tenants ahead of it get at most this many prefill tokens a step (shorter steps for its newcomers to wait out; their own long prompts start slower)"),
    fair_prefill_stretch: Optional[float] = typer.Option(None, "--fair-prefill-stretch", callback=_positive, help="Under vtc, the same cap in time: while a tenant behind has work, the prefill of the tenants ahead may lengthen a step by at most this fraction of a full decode step (--max-num-seqs decodes) under --cost-model (e.g. 0.3)"),
    urgent_slack_ms: Optional[float] = typer.Option(None, "--urgent-slack-ms", min=0.0, help="With --admission deadline: a request whose first token is due within this many ms runs one priority level ahead"),
    cost_model: Optional[str] = typer.Option(None, "--cost-model", help="Profile JSON timing this machine's steps (default: the committed SmolLM2-on-CPU one)"),
    instance_threads: Optional[str] = typer.Option(None, "--instance-threads", help="Comma-separated CPU threads per instance (a heterogeneous cluster)"),
    autoscale_max: Optional[int] = typer.Option(None, "--autoscale-max", help="Enable autoscaling up to this many instances"),
    autoscale_min: int = typer.Option(1, "--autoscale-min"),
    engine_process: bool = typer.Option(True, "--engine-process/--engine-thread", help="Run the engine core in its own process (the API process then does HTTP and tokenization beside it) or in a thread of the server"),
    engine_cpus: Optional[str] = typer.Option(None, "--engine-cpus", help="With --engine-process: comma-separated CPU ids to pin the engine process to"),
    speculative_config: Optional[str] = typer.Option(None, "--speculative-config", help='JSON, as vLLM takes it: n-gram drafting for every request, e.g. \'{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}\' (a request\'s own speculative_config overrides it)'),
    num_threads: Optional[int] = ThreadsOpt,
    dtype: Dtype = DtypeOpt,
    device: str = DeviceOpt,
    max_body_bytes: int = typer.Option(16 << 20, "--max-body-bytes", min=1, help="Answer 413 to a request body larger than this"),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", min=0.0, help="On SIGTERM, seconds to let requests in flight finish before ending them with an error"),
    tool_call_parser: Optional[ToolCallParser] = typer.Option(None, "--tool-call-parser", help="The format of the model's tool calls (default: from its chat template)"),
    tool_prompt: ToolPrompt = typer.Option("auto", "--tool-prompt", help="Give tools to the chat template, or describe them in a system message (auto: template if it renders tools)"),
    program_scheduling: ProgramScheduling = ProgramSchedulingOpt,
    program_config_json: Optional[str] = ProgramConfigOpt,
    gateway_file: Optional[Path] = typer.Option(None, "--gateway", help="YAML file of model pools (local models, upstream OpenAI-compatible URLs), routers and the semantic cache (see the README)"),
    embedding_model: Optional[str] = typer.Option(None, "--embedding-model", help="Folder of a sentence-embedding model for /v1/embeddings and the semantic cache (default: the packaged all-MiniLM-L6-v2; none: neither)"),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log a line per HTTP request: method, path, status, time, request id (never a prompt or key)"),
) -> None:
    """Serve the OpenAI API (completions, chat, models, tokenize, metrics)."""
    import uvicorn

    from shoal.server.listen import listen_socket

    from shoal.engine.config import EngineConfig
    from shoal.gateway.config import GatewayConfig
    from shoal.gateway.setup import build_gateway
    from shoal.model.loader import default_model_path
    from shoal.server.api import create_app
    from shoal.server.lifecycle import Lifecycle, ShoalServer

    log = logging.getLogger("shoal.serve")
    opts = ctx.obj or {}
    logs.configure(opts.get("log_level") or "info", opts.get("log_format", "text"))
    from shoal.engine.metadata import SLO

    if keys and api_key:
        raise typer.BadParameter("give --api-key or --keys, not both")
    if keys:
        from shoal.server.tenants import KeyRing

        try:
            api_key = KeyRing.load(keys)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    with user_errors():
        if instances > 1 or ray_address or autoscale_max:
            require("cluster", "shoal serve --instances/--ray-address/--autoscale-max")
        sock = listen_socket(host, port)  # before the model loads: a port in use fails in a second, not after it
        name = served_model_name or Path(model or default_model_path()).name.removesuffix(".gguf")
        gateway_config = GatewayConfig.load(gateway_file, name) if gateway_file else GatewayConfig.single(name)
        slo = SLO(slo_ttft_ms / 1e3, slo_tpot_ms / 1e3)
        config = EngineConfig(model=model, dtype=dtype, device=device, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                              kv_cache_gb=kv_cache_gb, kv_tier_gb=kv_tier_gb, block_size=block_size,
                              swap_space_gb=swap_space, enable_prefix_caching=enable_prefix_caching,
                              preemption_mode=preemption_mode, priority_aging_s=priority_aging_s,
                              kv_tier_path=None if kv_tier_path is None else str(kv_tier_path),
                              num_threads=num_threads, admission=admission,
                              scheduling_policy=scheduling_policy, fair_first_token=fair_first_token,
                              fair_prefill_tokens=fair_prefill_tokens, fair_prefill_stretch=fair_prefill_stretch,
                              urgent_slack_s=None if urgent_slack_ms is None else urgent_slack_ms / 1e3,
                              step_time_limit_s=slo.tpot_s if token_budget == "slo" else None, cost_model=cost_model,
                              speculative_config=parse_json_option("--speculative-config", speculative_config),
                              programs=program_config(program_scheduling, program_config_json))
    if instances > 1 or ray_address or autoscale_max:
        from shoal.cluster.cluster import ClusterEngine
        from shoal.control.policies import Autoscaler, make_migration_policy
        from shoal.model.loader import load_tokenizer

        role_list = roles.split(",") if roles else None
        try:
            threads = [int(t) for t in instance_threads.split(",")] if instance_threads else None
            backend = ClusterEngine(
                config, instances, dispatch, tokenizer=load_tokenizer(model or default_model_path()),
                roles=role_list, migration=make_migration_policy(migration), ray_address=ray_address,
                autoscaler=Autoscaler(autoscale_min, autoscale_max) if autoscale_max else None, max_waiting=max_waiting,
                slo=slo, instance_threads=threads,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    elif engine_process:
        from functools import partial

        from shoal.engine.engine import Engine
        from shoal.model.loader import load_tokenizer
        from shoal.server.engine_process import EngineProcess

        with user_errors():
            cpus = [int(c) for c in engine_cpus.split(",")] if engine_cpus else None
            backend = EngineProcess(partial(Engine, config), load_tokenizer(model or default_model_path()),
                                    max_waiting=max_waiting, slo=slo, cpus=cpus,
                                    adaptive_threads=num_threads is None and cpus is None,
                                    log_level=opts.get("log_level") or "info", log_format=opts.get("log_format", "text"))
    else:
        from shoal.engine.engine import Engine
        from shoal.server.async_engine import AsyncEngine

        with user_errors():
            engine = Engine(config)
        backend = AsyncEngine(engine, max_waiting=max_waiting, slo=slo)
    with user_errors():
        gateway = build_gateway(gateway_config, embedding_model, device, dtype)
    lifecycle = Lifecycle(drain_timeout)
    app = create_app(backend, name, api_key, max_body_bytes=max_body_bytes, lifecycle=lifecycle,
                     tool_parser=tool_call_parser, tool_prompt=tool_prompt, open_metrics=open_metrics,
                     access_log=access_log, gateway=gateway)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    def ready() -> None:
        hint = " (all interfaces)" if host in ("0.0.0.0", "::") else " (loopback only: --host 0.0.0.0 to serve other machines)" \
            if host in ("127.0.0.1", "localhost", "::1") else ""
        log.info("Shoal ready: model %r at %s/v1%s, max_model_len %d", name, url, hint, backend.max_model_len)

    config = uvicorn.Config(app, log_config=None, log_level=(opts.get("log_level") or "info"), access_log=False)
    ShoalServer(config, lifecycle, backend, on_ready=ready).run(sockets=[sock])
    if lifecycle.exit_code:
        raise typer.Exit(lifecycle.exit_code)


@bench_app.command("offline")
def bench_offline(
    model: Optional[str] = ModelOpt,
    num_requests: int = typer.Option(64, "--num-requests", "-n"),
    concurrency: int = typer.Option(8, "--concurrency", "-c", help="Requests in flight at once"),
    input_len: int = typer.Option(110, "--input-len"),
    output_len: int = typer.Option(128, "--output-len"),
    max_num_batched_tokens: int = typer.Option(512, "--max-num-batched-tokens"),
    baseline: bool = typer.Option(False, "--baseline", help="Also run transformers generate on the same weights and batches"),
    dtype: Dtype = DtypeOpt,
    device: str = DeviceOpt,
    num_threads: Optional[int] = ThreadsOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Write the result JSON here"),
) -> None:
    """Run N fixed-length requests through the engine, C at a time; print throughput, TTFT, TPOT."""
    from shoal.bench.offline import check_offline_args, run_offline_bench, run_transformers_baseline
    from shoal.engine.config import EngineConfig
    from shoal.engine.engine import Engine
    from shoal.progress import bar

    with user_errors():
        check_offline_args(num_requests, concurrency, input_len, output_len)
        with bar("loading the model"):
            engine = Engine(EngineConfig(model=model, dtype=dtype, device=device, max_num_seqs=concurrency,
                                         max_num_batched_tokens=max_num_batched_tokens, num_threads=num_threads))
    with bar("requests", num_requests) as progress:
        result = run_offline_bench(engine=engine, num_requests=num_requests, concurrency=concurrency,
                                   input_len=input_len, output_len=output_len, progress=progress)
    if baseline:
        with bar("transformers baseline: batches") as progress:
            base = run_transformers_baseline(
                model=model, num_requests=num_requests, concurrency=concurrency, input_len=input_len,
                output_len=output_len, dtype=dtype, progress=progress,
            )
        result["baseline_transformers"] = base
        result["speedup_vs_transformers"] = result["output_token_throughput"] / base["output_token_throughput"]
    typer.echo(json.dumps(result, indent=2))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))


@bench_app.command("serve")
def bench_serve(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Base URL of an OpenAI-compatible server"),
    workload: str = typer.Option("poisson", "--workload", help="poisson | gamma | trace:PATH (Azure or BurstGPT CSV) | agent:PATH (agent programs, JSON lines: bench agent-trace)"),
    rate: float = typer.Option(1.0, "--rate", help="Mean arrivals per second (poisson, gamma)"),
    burstiness: float = typer.Option(0.5, "--burstiness", help="Gamma shape: <1 bursty, 1 Poisson"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Closed loop: keep C requests in flight"),
    time_scale: float = typer.Option(1.0, "--time-scale", help="Trace: multiply arrival gaps (0.5 = 2x rate)"),
    trace_start: float = typer.Option(0.0, "--trace-start", help="Trace: skip requests before this second"),
    num_requests: int = typer.Option(100, "--num-requests", "-n"),
    max_duration: float = typer.Option(600.0, "--max-duration", help="Stop after this many seconds"),
    prompt_len: int = typer.Option(128, "--prompt-len"),
    output_len: int = typer.Option(128, "--output-len"),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Clip trace requests to this many tokens (default: the server's max_model_len if it says, else 2048)"),
    prefix_groups: int = typer.Option(0, "--prefix-groups", help="Put requests in this many groups sharing a prompt prefix (system prompts, conversations); 0: none"),
    prefix_len: int = typer.Option(256, "--prefix-len", help="Tokens each prefix group shares"),
    tenants: Optional[str] = typer.Option(None, "--tenants", help="Tenant mix by share of the arrivals, e.g. heavy=10,light=1 (sent as `user`)"),
    slo_ttft_ms: float = typer.Option(1000.0, "--slo-ttft-ms"),
    slo_tpot_ms: float = typer.Option(100.0, "--slo-tpot-ms"),
    model: Optional[str] = typer.Option(None, "--model", help="Model name to send (default: the server's first)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="GGUF or HF folder for building prompts (default: built-in SmolLM2)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("bench-out"), "--out", help="Directory for result.json, requests.jsonl, plots"),
) -> None:
    """Replay a workload against a server; write the result JSON and plots."""
    with user_errors():
        require("bench", "shoal bench serve (its plots)")
    import asyncio

    import httpx

    from shoal.bench import report
    from shoal.bench.agent import AgentWorkload, program_summary
    from shoal.bench.serve import Unreachable, check_server, run_workload
    from shoal.model.loader import default_model_path, load_tokenizer
    from shoal.progress import bar

    try:  # before anything slow: a wrong URL is one line, now
        info = check_server(url, api_key)
    except Unreachable as exc:
        typer.echo(f"Error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(2) from None
    if workload.startswith(("trace:", "agent:")) and max_context is None:
        try:
            max_context = int(info.get("max_model_len") or 2048)
        except (TypeError, ValueError):
            max_context = 2048
    wl = _build_workload(workload, rate, burstiness, concurrency, time_scale, trace_start, num_requests,
                         prompt_len, output_len, max_context, seed, prefix_groups, prefix_len, tenants)
    with bar("loading the tokenizer"):
        tok = load_tokenizer(tokenizer or default_model_path())
    agent = isinstance(wl, AgentWorkload)
    try:
        with bar("programs" if agent else "requests") as progress:
            records, queue, duration = asyncio.run(run_workload(
                url, wl, tok, model=model or info["id"], concurrency=concurrency, max_duration_s=max_duration,
                api_key=api_key, progress=progress))
    except httpx.HTTPError as exc:
        typer.echo(f"Error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(2) from None
    result = report.summarize(records, wl.description, slo_ttft_ms, slo_tpot_ms, duration_s=duration,
                              extra={"url": url})
    if agent:
        result["programs"] = program_summary(wl, records)
    _finish_run(out, result, records, queue, "lower --rate or --concurrency, raise --time-scale, "
                "or give the server more instances")


@bench_app.command("agent-trace")
def bench_agent_trace(
    out: Path = typer.Argument(..., help="The JSON-lines file to write"),
    preset: AgentPreset = typer.Option("swe", "--preset", help="swe: SWE-bench software agents; bfcl: BFCL multi-turn function calling"),
    num_programs: int = typer.Option(50, "--num-programs", "-n", min=1),
    rate: float = typer.Option(0.5, "--rate", help="Programs arriving per second"),
    burstiness: float = typer.Option(1.0, "--burstiness", help="Gamma shape of the gaps between programs: <1 bursty, 1 Poisson"),
    turns_mean: Optional[float] = typer.Option(None, "--turns-mean", help="Mean turns per program (default: the preset's)"),
    scale_tokens: float = typer.Option(1.0, "--scale-tokens", help="Multiply every token count (a small model on a CPU wants smaller programs)"),
    tenants: Optional[str] = typer.Option(None, "--tenants", help="Tenant mix by share of the programs, e.g. a=3,b=1"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write an agent trace (programs of turns separated by tool pauses) for --workload agent:PATH."""
    from shoal.bench import agent
    from shoal.bench.workloads import parse_shares

    try:
        programs = agent.generate(preset, num_programs, rate, seed, scale_tokens, turns_mean, burstiness,
                                  parse_shares(tenants, "--tenants") if tenants else None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    agent.dump(programs, out)
    turns = [len(p.turns) for p in programs]
    typer.echo(json.dumps({"programs": len(programs), "turns": sum(turns), "turns_per_program_max": max(turns),
                           "span_s": programs[-1].arrival_s, "out": str(out)}))


@bench_app.command("gateway-trace")
def bench_gateway_trace(
    out: Path = typer.Argument(..., help="The JSON-lines file to write"),
    queries: Optional[Path] = typer.Option(None, "--queries", help="Texts to draw from: a JSON-lines file of {category, query, candidate, match} (e.g. benchmarks/gateway/paraphrases.jsonl; matching pairs are paraphrases); default: the cache categories' examples"),
    num_queries: int = typer.Option(200, "--num-queries", "-n", min=1),
    rate: float = typer.Option(2.0, "--rate", help="Queries arriving per second (Poisson)"),
    repeat: float = typer.Option(0.3, "--repeat", min=0.0, max=1.0, help="Share of queries repeating an earlier one"),
    paraphrase: float = typer.Option(0.5, "--paraphrase", min=0.0, max=1.0, help="Share of repeats that are a paraphrase (where the texts have one) instead of verbatim"),
    output_len: int = typer.Option(128, "--output-len", min=1, help="Median output tokens (lognormal)"),
    tenants: Optional[str] = typer.Option(None, "--tenants", help="Tenant mix by share of the queries, e.g. a=3,b=1"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="GGUF or HF folder whose chat template counts prompt tokens (default: built-in SmolLM2)"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a gateway trace (queries with their text) for sim --gateway CONFIG --workload gateway:PATH."""
    from shoal.bench import gateway_trace as gt
    from shoal.bench.workloads import parse_shares
    from shoal.gateway.semantic_cache import load_categories
    from shoal.model.loader import default_model_path, load_tokenizer

    try:
        source = gt.paraphrase_source(queries) if queries else gt.category_source(load_categories())
        shares = parse_shares(tenants, "--tenants") if tenants else None
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    with user_errors():
        tok = load_tokenizer(tokenizer or default_model_path())

    def count(text: str) -> int:
        chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return len(tok.encode(chat, add_special_tokens=False))

    try:
        trace = gt.generate(source, num_queries, rate, repeat, paraphrase, count, output_len, shares, seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    gt.dump(trace, out)
    typer.echo(json.dumps({"queries": len(trace), "distinct": len({q.query for q in trace}),
                           "span_s": trace[-1].arrival_s, "out": str(out)}))


def _finish_run(out: Path, result: dict, records: list, queue: list | None, advice: str) -> None:
    """End a ``bench serve`` or ``sim`` run: judge it (:func:`report.verdict`, ``advice`` when it was
    overloaded), write its folder, print the JSON on stdout and the verdict (unless ok) on stderr."""
    from shoal.bench import report

    result["verdict"] = report.verdict(result, advice)
    report.write(out, result, records, queue)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "workload"}, indent=2))
    if result["verdict"]["status"] != "ok":
        typer.echo(result["verdict"]["message"], err=True)
    typer.echo(f"wrote {out}/result.json, requests.jsonl, {', '.join(report.PLOTS)}, report.html", err=True)


def _build_workload(workload: str, rate: float, burstiness: float, concurrency: Optional[int], time_scale: float,
                    trace_start: float, num_requests: int, prompt_len: int, output_len: int,
                    max_context: Optional[int], seed: int, prefix_groups: int = 0, prefix_len: int = 0,
                    tenants: Optional[str] = None, tenant_weights: Optional[str] = None):
    from shoal.bench import workloads

    try:
        if workload.startswith("agent:"):
            from shoal.bench import agent

            if prefix_groups or tenants or tenant_weights or concurrency is not None:
                raise ValueError("an agent trace carries its own prefixes and tenants: drop --prefix-groups, "
                                 "--tenants, --tenant-weights and --concurrency")
            return agent.load(workload[6:], time_scale=time_scale, max_context=max_context)
        if workload.startswith("trace:"):
            wl = workloads.load_trace(workload[6:], time_scale=time_scale, max_context=max_context,
                                      num_requests=num_requests, start_s=trace_start)
        elif concurrency is not None:
            wl = workloads.closed_loop(num_requests, concurrency, prompt_len, output_len)
        else:
            wl = workloads.synthetic(workload, num_requests, rate, prompt_len, output_len, burstiness, seed)
        if prefix_groups:
            wl = workloads.with_prefix_groups(wl, prefix_groups, prefix_len, seed)
        if tenant_weights and not tenants:
            raise ValueError("--tenant-weights needs --tenants")
        if tenants:
            weights = workloads.parse_shares(tenant_weights, "--tenant-weights") if tenant_weights else None
            wl = workloads.with_tenants(wl, workloads.parse_shares(tenants, "--tenants"), weights, seed)
        return wl
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@app.command()
def profile(
    out: Path = typer.Option(Path("profile.json"), "--out", help="Where to write the fitted cost model"),
    model: Optional[str] = ModelOpt,
    repeats: int = typer.Option(3, "--repeats"),
    dtype: Dtype = DtypeOpt,
    device: str = DeviceOpt,
) -> None:
    """Time the engine's steps over a grid of batch shapes and fit the simulator's cost model."""
    with user_errors():
        require("sim", "shoal profile")
    from shoal.engine.config import EngineConfig
    from shoal.engine.engine import Engine
    from shoal.progress import bar
    from shoal.sim.profile import fit_profile

    with user_errors(), bar("loading the model"):
        engine = Engine(EngineConfig(model=model, dtype=dtype, device=device, max_num_seqs=64))
    with bar("profiling: batch shapes") as progress:
        cost = fit_profile(engine, repeats, progress)
    cost.save(out)
    typer.echo(json.dumps({"device": cost.device, "model": cost.model, "dtype": cost.dtype, "fit": cost.fit}, indent=2))
    typer.echo(f"wrote {out}", err=True)


@app.command()
def sim(
    workload: str = typer.Option("poisson", "--workload", help="poisson | gamma | trace:PATH (Azure or BurstGPT CSV) | agent:PATH (agent programs, JSON lines: bench agent-trace) | gateway:PATH (queries with their text, JSON lines: bench gateway-trace; with --gateway)"),
    rate: float = typer.Option(1.0, "--rate"),
    burstiness: float = typer.Option(0.5, "--burstiness"),
    time_scale: float = typer.Option(1.0, "--time-scale"),
    trace_start: float = typer.Option(0.0, "--trace-start"),
    num_requests: int = typer.Option(100, "--num-requests", "-n"),
    prompt_len: int = typer.Option(128, "--prompt-len"),
    output_len: int = typer.Option(128, "--output-len"),
    max_context: int = typer.Option(2048, "--max-context", help="Clip trace requests to this many tokens"),
    prefix_groups: int = typer.Option(0, "--prefix-groups", help="Put requests in this many groups sharing a prompt prefix (system prompts, conversations); 0: none"),
    prefix_len: int = typer.Option(256, "--prefix-len", help="Tokens each prefix group shares"),
    instances: int = typer.Option(1, "--instances"),
    cost_model: Optional[Path] = typer.Option(None, "--cost-model", help="Fitted profile JSON (default: the committed SmolLM2-on-CPU one)"),
    dispatch: Dispatch = typer.Option("predicted_latency", "--dispatch", "--policy", help="As in serve (--policy is the old name)"),
    migration: Migration = typer.Option("llumnix", "--migration", help="As in serve"),
    roles: Optional[str] = typer.Option(None, "--roles", help="Comma-separated per-instance roles: both | prefill | decode"),
    speeds: Optional[str] = typer.Option(None, "--speeds", help="Per-instance speed relative to the cost model, e.g. 8x1,8x0.5 (default: all 1)"),
    token_budget: TokenBudget = typer.Option("fixed", "--token-budget", help="fixed: --max-num-batched-tokens per step; slo: also cut prefill chunks so a step with decodes stays within the TPOT SLO"),
    admission: Admission = typer.Option("fcfs", "--admission", help="deadline: at equal priority, admit requests still within the TTFT SLO before late ones"),
    scheduling_policy: SchedulingPolicy = typer.Option("vtc", "--scheduling-policy", help="As in serve"),
    fair_first_token: bool = typer.Option(True, "--fair-first-token/--no-fair-first-token", help="As in serve"),
    fair_prefill_tokens: Optional[int] = typer.Option(None, "--fair-prefill-tokens", min=1, help="As in serve"),
    fair_prefill_stretch: Optional[float] = typer.Option(None, "--fair-prefill-stretch", callback=_positive, help="As in serve"),
    urgent_slack_ms: Optional[float] = typer.Option(None, "--urgent-slack-ms", min=0.0, help="As in serve (with --admission deadline)"),
    tenants: Optional[str] = typer.Option(None, "--tenants", help="Tenant mix by share of the arrivals, e.g. heavy=10,light=1"),
    tenant_weights: Optional[str] = typer.Option(None, "--tenant-weights", help="Fair-share weights of the --tenants, e.g. gold=3,bronze=1 (default 1)"),
    link_gbps: float = typer.Option(10.0, "--link-gbps", help="Bandwidth of KV copies between instances, Gbit/s"),
    link_latency_ms: float = typer.Option(1.0, "--link-latency-ms", help="Fixed time per KV copy"),
    num_blocks: int = typer.Option(2800, "--num-blocks", help="KV blocks per instance"),
    kv_tier_blocks: int = typer.Option(0, "--kv-tier-blocks", min=0, help="Second-tier KV blocks per instance: evicted prefix blocks are kept there and loaded back on a hit (0: none)"),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs"),
    max_num_batched_tokens: int = typer.Option(512, "--max-num-batched-tokens"),
    slo_ttft_ms: float = typer.Option(1000.0, "--slo-ttft-ms"),
    slo_tpot_ms: float = typer.Option(100.0, "--slo-tpot-ms"),
    capacity: Optional[float] = typer.Option(None, "--capacity", help="Find the busiest time scale (trace) at which this fraction of requests meets both SLOs; --time-scale is ignored"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("sim-out"), "--out"),
    validate: bool = typer.Option(False, "--validate", help="Also run the workload on the real engine (one instance) and print the errors"),
    program_scheduling: ProgramScheduling = ProgramSchedulingOpt,
    program_config_json: Optional[str] = ProgramConfigOpt,
    gateway_file: Optional[Path] = typer.Option(None, "--gateway", help="With --workload gateway:PATH: the gateway config (pools, routers, cache; as serve --gateway) whose cache and router decide each query; the served pool is the cluster the other options describe"),
    gateway_model: Optional[str] = typer.Option(None, "--gateway-model", help="The pool or router the trace's queries ask for (default: the first router, else the served model)"),
    small_pass_rate: str = typer.Option("0.8", "--small-pass-rate", help="Share of a router's small answers that pass its checks, for queries whose trace line has no small_ok: RATE or CATEGORY=RATE,... (drawn with --seed)"),
    pool_speed: Optional[str] = typer.Option(None, "--pool-speed", help="A pool's speed relative to the cost model, e.g. big=0.25 (every step 4x as long; default 1)"),
    pool_instances: Optional[str] = typer.Option(None, "--pool-instances", help="Simulated instances of a local pool, e.g. llama-8b=2 (default: --instances for the served pool, 1 for others)"),
    lookup_ms: float = typer.Option(12.0, "--lookup-ms", help="The gateway's time to embed a query and search the cache, before a hit is answered or a miss reaches its pool"),
) -> None:
    """Simulate a cluster on the real scheduler code with a cost model; same JSON as bench serve."""
    with user_errors():
        require("sim", "shoal sim")
    from shoal.control.policies import check_roles
    from shoal.engine.metadata import SLO
    from shoal.engine.cost_model import LinearCostModel, default_profile_path
    from shoal.progress import bar
    from shoal.sim.experiment import SimSetup, parse_speeds

    cm = LinearCostModel.load(cost_model or default_profile_path())
    try:
        programs = program_config(program_scheduling, program_config_json)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    gateway_run = workload.startswith("gateway:")
    if gateway_run != (gateway_file is not None):
        raise typer.BadParameter("--workload gateway:PATH and --gateway go together")
    if gateway_run and (validate or capacity is not None or tenants or prefix_groups):
        raise typer.BadParameter("--validate, --capacity, --tenants and --prefix-groups do not apply to a gateway "
                                 "trace (it carries its own tenants)")
    if validate:
        from shoal.bench.agent import AgentWorkload
        from shoal.engine.config import EngineConfig
        from shoal.engine.engine import Engine
        from shoal.sim.validate import compare, compare_agent, stale_cost_model

        try:
            wl = _build_workload(workload, rate, burstiness, None, time_scale, trace_start, num_requests, prompt_len,
                                 output_len, max_context, seed, prefix_groups, prefix_len, tenants, tenant_weights)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        with bar("loading the model"), user_errors():
            engine = Engine(EngineConfig(
                num_blocks=num_blocks, num_tier_blocks=kv_tier_blocks, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, programs=programs, scheduling_policy=scheduling_policy,
                fair_first_token=fair_first_token, fair_prefill_tokens=fair_prefill_tokens,
                fair_prefill_stretch=fair_prefill_stretch, admission=admission,
                urgent_slack_s=None if urgent_slack_ms is None else urgent_slack_ms / 1e3,
                step_time_limit_s=slo_tpot_ms / 1e3 if token_budget == "slo" else None,
                cost_model=None if cost_model is None else str(cost_model)))
        agent = isinstance(wl, AgentWorkload)
        with bar(f"real run: {'programs' if agent else 'requests'}") as progress:
            fidelity = (compare_agent(wl, engine, cm, progress) if agent
                        else compare(wl, engine, cm, (slo_ttft_ms, slo_tpot_ms), progress))
        out.mkdir(parents=True, exist_ok=True)
        (out / "fidelity.json").write_text(json.dumps(fidelity, indent=2))
        calibrated = out / "calibrated_cost_model.json"
        if "calibrated" in fidelity:  # the cost model fitted on the real steps, for a later --cost-model
            calibrated.write_text(json.dumps(fidelity["calibrated"]["cost_model"], indent=2))
        typer.echo(json.dumps(fidelity, indent=2))
        warning = stale_cost_model(fidelity, str(calibrated))
        if warning is not None:
            typer.echo(f"warning: {warning}", err=True)
        return
    try:
        setup = SimSetup(
            cost_model=cm, speeds=parse_speeds(speeds, instances), dispatch=dispatch,
            migration=migration, roles=check_roles(roles.split(",") if roles else None, instances),
            slo=SLO(slo_ttft_ms / 1e3, slo_tpot_ms / 1e3), slo_steps=token_budget == "slo",
            deadlines=admission == "deadline", scheduling_policy=scheduling_policy, fair_first_token=fair_first_token,
            fair_prefill_tokens=fair_prefill_tokens, fair_prefill_stretch=fair_prefill_stretch,
            urgent_slack_s=None if urgent_slack_ms is None else urgent_slack_ms / 1e3, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, link_gbps=link_gbps, link_latency_ms=link_latency_ms, seed=seed,
            programs=programs, num_tier_blocks=kv_tier_blocks)
        setup.check()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if gateway_run:
        from shoal.gateway.embedder import Embedder
        from shoal.sim.gateway import prepare_trace

        with user_errors():
            trace_run = prepare_trace(workload[8:], gateway_file, setup, target=gateway_model, pass_rates=small_pass_rate,
                                      pool_speed=pool_speed, pool_instances=pool_instances, lookup_ms=lookup_ms,
                                      seed=seed)
            with bar("loading the embedding model"):
                embedder = Embedder()
        with bar("simulating the gateway: embedding the trace, then its queries"):
            result, records = trace_run.run(embedder.embed)
        _finish_run(out, result, records, None, "lower the trace's rate, or add --instances, --pool-instances "
                    "or --pool-speed")
        return

    def build(ts: float):
        return _build_workload(workload, rate, burstiness, None, ts, trace_start, num_requests, prompt_len,
                               output_len, max_context, seed, prefix_groups, prefix_len, tenants, tenant_weights)

    if capacity is not None:
        from shoal.sim.capacity import find_capacity

        if not workload.startswith("trace:"):
            raise typer.BadParameter("--capacity varies a trace's time scale: use --workload trace:PATH")
        runs: dict[float, list] = {}

        def attainment(ts: float) -> dict:
            progress.describe(f"capacity probe {len(runs) + 1}, time scale {ts:.3f}: requests")
            result, records = setup.run(build(ts), progress)
            runs[ts] = records
            typer.echo(f"time scale {ts:.3f}: rate {result['workload']['rate']:.2f} req/s, "
                       f"attainment {result['slo_attainment']:.3f}", err=True)
            return result

        try:
            with bar("capacity probe") as progress:
                found = find_capacity(attainment, capacity)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        if found is None:
            typer.echo(f"even the lightest time scale tried misses {capacity:.0%} attainment", err=True)
            raise typer.Exit(1)
        result = {**found.result, "capacity": {"target": capacity, "time_scale": found.time_scale,
                                               "rate_rps": found.rate_rps, "probes": found.probes}}
        records = runs[found.time_scale]
    else:
        wl = build(time_scale)
        with bar("simulating: requests") as progress:
            result, records = setup.run(wl, progress)
    _finish_run(out, result, records, None, "lower --rate, raise --time-scale, or add --instances")


@app.command()
def plan(
    workload: str = typer.Option("poisson", "--workload", help="poisson | gamma | trace:PATH"),
    rate: float = typer.Option(5.0, "--rate"),
    burstiness: float = typer.Option(0.5, "--burstiness"),
    time_scale: float = typer.Option(1.0, "--time-scale"),
    trace_start: float = typer.Option(0.0, "--trace-start"),
    num_requests: int = typer.Option(1000, "--num-requests", "-n"),
    prompt_len: int = typer.Option(512, "--prompt-len"),
    output_len: int = typer.Option(128, "--output-len"),
    model: str = typer.Option("llama-3-8b", "--model", help="A model shape from the catalog"),
    gpu: Optional[list[str]] = typer.Option(None, "--gpu", help="Only these GPU types (repeatable)"),
    catalog: Optional[str] = typer.Option(None, "--catalog", help="Catalog JSON (default: the shipped one)"),
    slo_ttft_ms: float = typer.Option(1000.0, "--slo-ttft-ms"),
    slo_tpot_ms: float = typer.Option(100.0, "--slo-tpot-ms"),
    attainment: float = typer.Option(0.9, "--attainment", help="Fraction of requests that must meet both SLOs"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Find the cheapest GPU mix meeting the SLO for a workload, and verify it in simulation."""
    with user_errors():
        require("sim", "shoal plan")
    from shoal.progress import bar
    from shoal.sim import catalog as cat
    from shoal.sim.planner import make_plan

    wl = _build_workload(workload, rate, burstiness, None, time_scale, trace_start, num_requests, prompt_len,
                         output_len, cat.model_shape(model, catalog).max_model_len, seed)
    gpus = cat.gpus(catalog)
    if gpu:
        unknown = set(gpu) - set(gpus)
        if unknown:
            raise typer.BadParameter(f"unknown GPU types {sorted(unknown)}; the catalog has {sorted(gpus)}")
        gpus = {g: gpus[g] for g in gpu}
    try:
        with bar("planning: capacity searches, then the check") as progress:
            result = make_plan(wl, cat.model_shape(model, catalog), gpus, slo_ttft_ms, slo_tpot_ms, attainment,
                               seed=seed, progress=progress)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    out = _plan_json(result)
    if not result.meets_target:
        met = result.verification["slo_attainment"]
        better = result.suggestion
        out["warning"] = (f"the simulated check of this mix met both SLOs for {met:.0%} of requests, below the "
                          f"{attainment:.0%} asked; " + (
                              f"{_mix(better.counts)} (${better.cost_per_hour:.2f}/h) meets it: see 'suggestion'"
                              if better else "no mix tried met it: lower the load, relax the SLO or --attainment"))
        typer.echo(f"Warning: {out['warning']}", err=True)
    typer.echo(json.dumps(out, indent=2))


def _mix(counts: dict[str, int]) -> str:
    """``{"L4": 2, "H100": 1}`` -> ``"2 x L4 + 1 x H100"``."""
    return " + ".join(f"{n} x {g}" for g, n in counts.items())


def _plan_json(plan) -> dict:
    """A :class:`Plan` as ``shoal plan`` prints it: the verification cut to its headline figures,
    and the suggestion (if any) as a plan of its own."""
    from dataclasses import asdict

    out = asdict(plan)
    ver = out.pop("verification") or {}
    out["verified"] = {k: ver.get(k) for k in ("goodput_rps", "slo_attainment", "request_throughput", "completed", "num_requests")}
    out["verified"]["ttft_p90_ms"] = ver.get("ttft_ms", {}).get("p90")
    out["verified"]["tpot_p90_ms"] = ver.get("tpot_ms", {}).get("p90")
    if plan.suggestion is not None:
        out["suggestion"] = _plan_json(plan.suggestion)
    return out


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"shoal {version('shoal')}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Same as --log-level debug"),
    log_level: Optional[Literal[logs.LEVELS]] = typer.Option(None, "--log-level", help="Log records at this level and above, on stderr (default: info for serve, warning otherwise)"),
    log_format: Literal[logs.FORMATS] = typer.Option("text", "--log-format", help="text, or one JSON object a line"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit"),
) -> None:
    """Global options; they may also follow the subcommand (``shoal serve -v``)."""
    chosen = "debug" if verbose else log_level
    ctx.obj = {"log_level": chosen, "log_format": log_format}
    logs.configure(chosen or "warning", log_format)


GLOBAL_FLAGS = {"-v": 0, "--verbose": 0, "--log-level": 1, "--log-format": 1}


def hoist_global_flags(argv: list[str]) -> list[str]:
    """``argv`` with the global options moved before the subcommand, so that ``shoal serve -v`` and
    ``shoal sim --log-level debug`` work as ``shoal -v serve``. Nothing after ``--`` moves."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        name = arg.split("=", 1)[0]
        takes = GLOBAL_FLAGS.get(name)
        if takes is None:
            rest.append(arg)
            i += 1
            continue
        n = 1 if "=" in arg else 1 + takes
        front += argv[i : i + n]
        i += n
    return front + rest


def run() -> None:
    """The ``shoal`` command (and ``python -m shoal``)."""
    import sys

    app(args=hoist_global_flags(sys.argv[1:]), prog_name="shoal", auto_envvar_prefix="SHOAL")


if __name__ == "__main__":
    run()
