"""Argument parsing for `python -m client`; the commands themselves live in client.commands.

Global options (--target, --auth-token, --timeout, the --tls* ones) are accepted before or
after the command name, so `python -m client stats --target h:1` works as well.
"""

from __future__ import annotations

import argparse
import codecs
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.bench import LengthDist
from client.bench_openai import ENDPOINTS
from client.channel import split_targets
from client.request import PRIORITY_NAMES
from client.sync import DEFAULT_TARGET

TARGET_ENV = "SHOAL_TARGET"
TOKEN_ENV = "SHOAL_AUTH_TOKEN"
HTTP_TARGET_ENV = "SHOAL_HTTP_TARGET"
# --tls-ca / --tls-cert / --tls-key: PEM files, each also from an environment variable.
TLS_ENVS = {"tls_ca": "SHOAL_TLS_CA", "tls_cert": "SHOAL_TLS_CERT", "tls_key": "SHOAL_TLS_KEY"}
TLS_SERVER_NAME_ENV = "SHOAL_TLS_SERVER_NAME"
DEFAULT_HTTP_TARGET = "http://127.0.0.1:8000"


def int_list(text: str) -> list[int]:
    """ "1,2,3" -> [1, 2, 3] (spaces allowed); token ids, so each in [0, 2**32)."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from err
    if any(not 0 <= v < 2**32 for v in values):
        raise argparse.ArgumentTypeError(f"token ids must be in [0, 2**32): {text!r}")
    return values


def unsigned(bits: int) -> Callable[[str], int]:
    """An argparse type for the proto's uint32 / uint64 fields: the range is named."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected an integer: {text!r}") from err
        if not 0 <= value < 2**bits:
            raise argparse.ArgumentTypeError(f"must be in [0, 2**{bits}) (got {value})")
        return value

    return parse


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    # Sub-commands get the same options with SUPPRESS defaults, so their unset copies don't
    # overwrite values given before the command name.
    p = argparse.ArgumentParser(add_help=False)
    suppress = argparse.SUPPRESS
    p.add_argument(
        "--target",
        action="append",
        default=None if defaults else suppress,
        help=f"gRPC host:port, repeatable or comma-separated; several are balanced round_robin; "
        f"dns:///name:port also works (env {TARGET_ENV}, default {DEFAULT_TARGET})",
    )
    p.add_argument(
        "--auth-token",
        default=os.environ.get(TOKEN_ENV) if defaults else suppress,
        help=f"sent as 'authorization: Bearer <token>' (env {TOKEN_ENV})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None if defaults else suppress,
        help="deadline of each call in seconds (default: none)",
    )
    tls_help = {
        "tls_ca": "TLS: the CA certificate (PEM) the server's certificate must chain to",
        "tls_cert": "mutual TLS: this client's certificate (PEM), with --tls-key",
        "tls_key": "mutual TLS: this client's private key (PEM), with --tls-cert",
    }
    for dest, text in tls_help.items():
        env = TLS_ENVS[dest]
        p.add_argument(
            "--" + dest.replace("_", "-"),
            metavar="FILE",
            default=(os.environ.get(env) or None) if defaults else suppress,
            help=f"{text} (env {env})",
        )
    p.add_argument(
        "--tls",
        action="store_true",
        default=False if defaults else suppress,
        help="TLS with the system's root certificates (implied by --tls-ca or --tls-cert)",
    )
    p.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=(os.environ.get(TLS_SERVER_NAME_ENV) or None) if defaults else suppress,
        help="TLS: check the server's certificate against NAME instead of the target's host "
        f"(e.g. a probe of 127.0.0.1 whose certificate names the service; env "
        f"{TLS_SERVER_NAME_ENV})",
    )
    return p


def unescape(text: str) -> str:
    r"""Backslash escapes as in Python strings: `--stop "\n\n"` is two newlines."""
    return codecs.escape_decode(text.encode())[0].decode()


def _sampling_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-new-tokens", type=unsigned(32), default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=unsigned(32), default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.0, help="0 or 1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--seed", type=unsigned(64))
    p.add_argument(
        "--stop",
        action="append",
        type=unescape,
        default=[],
        metavar="S",
        help=r"repeatable; backslash escapes such as \n work",
    )
    p.add_argument("--stop-token-ids", type=int_list, default=[], metavar="1,2")
    p.add_argument("--priority", type=str.upper, choices=PRIORITY_NAMES)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument(
        "--repetition-penalty", type=float, default=0.0, help="Hugging Face's; 0 or 1 = off"
    )
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument(
        "--logprobs",
        type=unsigned(32),
        metavar="N",
        help="print each token's log-probability and its N most likely alternatives "
        "(0..20) to stderr",
    )
    p.add_argument("--system", help="a system message (with --chat, or in chat)")
    return p


def _request_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, parents=[_sampling_options()])
    p.add_argument("prompt", nargs="?", help="prompt text ('-' reads stdin)")
    p.add_argument("--token-ids", type=int_list, dest="prompt_token_ids", metavar="1,2,3")
    p.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message (chat template)"
    )
    p.add_argument("--request-id", default="")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shoal",
        description="Command-line client of a shoal server.",
        parents=[_global_options(defaults=True)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    common = _global_options(defaults=False)
    request = _request_options()

    def add(name: str, help_text: str, *parents: argparse.ArgumentParser) -> Any:
        return sub.add_parser(name, help=help_text, parents=[common, *parents])

    gen = add("generate", "generate and print a completion", request)
    gen.add_argument("--stream", action="store_true", help="print text as it arrives")
    add("submit", "enqueue a request and print its id", request)
    add(
        "chat",
        "a conversation in the terminal: history kept, each answer streamed "
        "(/reset clears it, /exit or end of input leaves)",
        _sampling_options(),
    ).set_defaults(max_new_tokens=256)
    stream = add("stream", "follow a submitted request")
    stream.add_argument("request_id")
    stream.add_argument("--from-index", type=unsigned(32), default=0, help="replay from this token")
    add("cancel", "abort a queued or running request").add_argument("request_id")
    add("stats", "load per worker and in total").add_argument("--json", action="store_true")
    add("info", "the served model").add_argument("--json", action="store_true")
    health = add(
        "health",
        "grpc.health.v1 check: exit 0 only when SERVING (a probe for Docker and Kubernetes)",
    )
    health.description = (
        "Ask the server's grpc.health.v1 service; exit 0 only when it says SERVING, else print "
        "why and exit 1. Plaintext, or TLS with --tls-ca (and --tls-cert/--tls-key for mutual "
        "TLS). The call's deadline is --timeout, 5 s by default."
    )
    health.add_argument(
        "--service", default="", help='"" (the server as a whole, the default) or a service name'
    )
    batch = add("batch", "run a JSONL file of requests (worker.batch formats)")
    batch.add_argument("--input", required=True, type=Path)
    batch.add_argument("--output", required=True, type=Path)
    batch.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    bench = add("bench", "serving load generator: latency and throughput tables")
    bench.description = (
        "Serving load generator: the same plan (Poisson arrivals, length distributions, "
        "seed) through gRPC (--api grpc, to --target) or the OpenAI-compatible HTTP API "
        "(--api openai, to --http-target, with the openai package)."
    )
    bench.add_argument(
        "--api",
        choices=("grpc", "openai"),
        help="grpc: the Inference service at --target (the default); openai: the "
        "OpenAI-compatible HTTP API at --http-target, through the openai package (pip "
        "install -e '.[bench]'); giving --http-target alone selects openai",
    )
    bench.add_argument(
        "--http-target",
        metavar="URL",
        help=f"base URL of the HTTP API, http://host:port (/v1 is added if missing; env "
        f"{HTTP_TARGET_ENV}, default {DEFAULT_HTTP_TARGET}); --auth-token is sent as the API key",
    )
    bench.add_argument(
        "--endpoint",
        choices=ENDPOINTS,
        default="completions",
        help="--api openai only: completions sends the prompt token ids (the same prompts as "
        "gRPC); chat sends them as words in a user message (chat template applied, prompt "
        "tokens as the server counts them)",
    )
    bench.add_argument(
        "--model",
        help="--api openai only: the request's model (default: the first /v1/models lists)",
    )
    bench.add_argument(
        "--vocab-size",
        type=int,
        help="prompt ids are drawn below this (default: the served model's vocab size)",
    )
    bench.add_argument("--requests", type=int, default=100)
    bench.add_argument(
        "--rate", type=float, default=math.inf, help="requests/s, Poisson; inf = all at once"
    )
    bench.add_argument("--concurrency", type=int, default=None, help="cap on requests in flight")
    bench.add_argument(
        "--prompt-len", type=_length, default=LengthDist(16, 512), metavar="N|LOW:HIGH"
    )
    bench.add_argument(
        "--output-len", type=_length, default=LengthDist(16, 256), metavar="N|LOW:HIGH"
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", type=Path, help="write every request's record here")
    bench.add_argument("--plot", type=Path, help="write a PNG (needs the bench extra: matplotlib)")
    return parser


def _length(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    raw = args.target or [os.environ.get(TARGET_ENV) or DEFAULT_TARGET]
    try:
        args.target = split_targets(raw)
    except ValueError as err:
        parser.error(str(err))
    _check_tls(parser, args)
    if args.command in ("generate", "submit"):
        if args.prompt == "-":
            args.prompt = sys.stdin.read()
        if (args.prompt is None) == (args.prompt_token_ids is None):
            parser.error(f"{args.command}: give exactly one of a prompt or --token-ids")
        if args.chat and args.prompt is None:
            parser.error(f"{args.command}: --chat sends the prompt text as a user message")
    if args.command in ("batch", "bench") and args.concurrency is not None and args.concurrency < 1:
        parser.error("--concurrency must be >= 1")
    if args.command == "bench":
        _check_bench(parser, args)
    return args


def _check_tls(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key (a client certificate) go together")
    for dest in TLS_ENVS:
        path = getattr(args, dest)
        if path is not None and not Path(path).is_file():
            parser.error(f"--{dest.replace('_', '-')} {path}: no such file")


def client_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ShoalClient / AsyncShoalClient keyword arguments the global options give."""
    names = ("auth_token", "timeout", "tls", *TLS_ENVS)
    kwargs = {name: getattr(args, name) for name in names}
    if args.tls_server_name:
        kwargs["options"] = [("grpc.ssl_target_name_override", args.tls_server_name)]
    return kwargs


def _check_bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.requests < 1 or not args.rate > 0:
        parser.error("bench: --requests must be >= 1 and --rate > 0")
    if args.vocab_size is not None and args.vocab_size < 2:
        parser.error("bench: --vocab-size must be >= 2")
    if args.api is None:
        args.api = "openai" if args.http_target else "grpc"
    if args.api == "grpc":
        given = [
            flag
            for flag, value in (
                ("--http-target", args.http_target),
                ("--endpoint", args.endpoint != "completions"),
                ("--model", args.model),
            )
            if value
        ]
        if given:
            parser.error(f"bench: {', '.join(given)} only with --api openai")
    else:
        args.http_target = (
            args.http_target or os.environ.get(HTTP_TARGET_ENV) or DEFAULT_HTTP_TARGET
        )


SAMPLING_NAMES = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "priority",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
)


def sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    """The build_request keyword arguments every request command shares."""
    params = {name: getattr(args, name) for name in SAMPLING_NAMES}
    if args.logprobs is not None:  # --logprobs N: the token's own and N alternatives
        params |= {"logprobs": True, "top_logprobs": args.logprobs}
    return params


def system_turn(args: argparse.Namespace) -> list[dict[str, str]]:
    return [{"role": "system", "content": args.system}] if args.system else []


def request_params(args: argparse.Namespace) -> dict[str, Any]:
    """The build_request keyword arguments of a generate/submit command line."""
    params = {**sampling_params(args), "request_id": args.request_id}
    if args.chat:
        turns = [*system_turn(args), {"role": "user", "content": args.prompt}]
        return {**params, "messages": turns}
    return {**params, "prompt": args.prompt, "prompt_token_ids": args.prompt_token_ids}
