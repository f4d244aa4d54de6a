"""``corral submit``: send one request through a gateway and print the answer as it comes.

The answer goes to standard output and nothing else does, so it can be piped; the job
id and timing go to standard error. With ``--no-wait`` the job is only queued (``POST
/jobs`` with ``wait: false``) and its id is printed, to be fetched later from
``GET /jobs/{id}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx
import orjson

DEFAULT_GATEWAY = "http://127.0.0.1:11434"
JOB_HEADER = "x-corral-job-id"
# The gateway answers with a 504 when a job waits past its own limit, so the client
# needs no read limit of its own: a job may sit in a long queue before its first token.
TIMEOUT = httpx.Timeout(10.0, read=None)


class SubmitError(Exception):
    """The gateway refused the request or the job failed; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral submit", description=__doc__)
    parser.add_argument("--model", required=True, help="model to run, e.g. llama3")
    parser.add_argument("--prompt", required=True, help="the prompt (the user message with --chat)")
    parser.add_argument(
        "--priority", type=int, choices=range(10), metavar="0-9", help="0 is the most urgent"
    )
    parser.add_argument(
        "--gateway", default=DEFAULT_GATEWAY, help=f"gateway URL (default {DEFAULT_GATEWAY})"
    )
    parser.add_argument("--chat", action="store_true", help="use /api/chat, not /api/generate")
    parser.add_argument("--no-stream", action="store_true", help="ask for the whole answer at once")
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for the answer (default), or only queue the job and print its id",
    )
    parser.add_argument("--api-key", help="bearer key, when the gateway requires one")
    return parser


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": args.model, "stream": not args.no_stream}
    if args.chat:
        body["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        body["prompt"] = args.prompt
    return body


def headers(args: argparse.Namespace) -> dict[str, str]:
    out: dict[str, str] = {}
    if args.priority is not None:
        out["X-Corral-Priority"] = str(args.priority)
    if args.api_key:
        out["Authorization"] = f"Bearer {args.api_key}"
    return out


def error_of(response: httpx.Response) -> str:
    """Ollama-style ``{"error": ...}`` bodies give their message; anything else as is."""
    try:
        body = orjson.loads(response.read())
    except orjson.JSONDecodeError:
        body = None
    message = body.get("error") if isinstance(body, dict) else None
    return f"{response.status_code}: {message or response.text.strip()}"


def text_of(chunk: dict[str, Any]) -> str:
    """The text in one generate or chat object (``response``, or the message content)."""
    message = chunk.get("message")
    if isinstance(message, dict):
        return str(message.get("content") or "")
    return str(chunk.get("response") or "")


def stream_answer(http: httpx.Client, path: str, body: dict[str, Any], hdrs: dict[str, str]) -> str:
    """Print the answer chunk by chunk; returns a summary line for standard error."""
    started = time.monotonic()
    with http.stream("POST", path, json=body, headers=hdrs) as response:
        if response.status_code >= 400:
            raise SubmitError(error_of(response))
        job_id = response.headers.get(JOB_HEADER, "?")
        last: dict[str, Any] = {}
        for line in response.iter_lines():
            if not line.strip():
                continue
            last = orjson.loads(line)
            if "error" in last:  # a failure after the first chunk arrives in the stream
                print(flush=True)
                raise SubmitError(f"job {job_id} failed: {last['error']}")
            print(text_of(last), end="", flush=True)
    print(flush=True)
    return summary(job_id, last, time.monotonic() - started)


def whole_answer(http: httpx.Client, path: str, body: dict[str, Any], hdrs: dict[str, str]) -> str:
    started = time.monotonic()
    response = http.post(path, json=body, headers=hdrs)
    if response.status_code >= 400:
        raise SubmitError(error_of(response))
    answer: dict[str, Any] = response.json()
    print(text_of(answer), flush=True)
    return summary(response.headers.get(JOB_HEADER, "?"), answer, time.monotonic() - started)


def summary(job_id: str, final: dict[str, Any], seconds: float) -> str:
    tokens = final.get("eval_count")
    counted = f", {tokens} tokens" if tokens is not None else ""
    return f"job {job_id}{counted}, {seconds:.2f}s"


def queue_only(http: httpx.Client, args: argparse.Namespace, hdrs: dict[str, str]) -> str:
    """``POST /jobs`` with ``wait: false``; prints the job id, returns how to fetch it."""
    job: dict[str, Any] = {
        "kind": "chat" if args.chat else "generate",
        "request": {k: v for k, v in request_body(args).items() if k != "stream"},
        "wait": False,
    }
    if args.priority is not None:
        job["priority"] = args.priority
    response = http.post("/jobs", json=job, headers=hdrs)
    if response.status_code >= 400:
        raise SubmitError(error_of(response))
    job_id = str(response.json()["id"])
    print(job_id, flush=True)
    return f"queued; fetch the result with: curl {args.gateway.rstrip('/')}/jobs/{job_id}"


def submit(args: argparse.Namespace) -> str:
    hdrs = headers(args)
    path = "/api/chat" if args.chat else "/api/generate"
    with httpx.Client(base_url=args.gateway, timeout=TIMEOUT) as http:
        if not args.wait:
            return queue_only(http, args, hdrs)
        if args.no_stream:
            return whole_answer(http, path, request_body(args), hdrs)
        return stream_answer(http, path, request_body(args), hdrs)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        note = submit(args)
    except SubmitError as exc:
        print(f"corral submit: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"corral submit: {args.gateway}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(note, file=sys.stderr)
    return 0
