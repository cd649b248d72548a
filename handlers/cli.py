"""The `parley` command line: demo, check, serve and bench. Thin: each command calls into core/infra."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from core.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parley", description="An open phone voice agent.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run one whole simulated call and report on it")
    demo.add_argument("--real", action="store_true", help="use the real providers (keys from the environment)")
    demo.add_argument("--out", default="demo-output", help="folder for the recording and the JSON report")

    commands.add_parser("check", help="does each configured provider accept our key and protocol")

    serve = commands.add_parser("serve", help="run a production server under uvicorn")
    serve.add_argument("app", choices=["media", "webhook", "both"], help="both: one port, for a tunnel")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--public-url",
        help="with both: the tunnel's https URL; PUBLIC_BASE_URL and MEDIA_STREAM_URL are derived from it",
    )

    bench = commands.add_parser("bench", help="measure latency, CPU and memory (DESIGN.md section 5)")
    bench.add_argument("--frames", action="store_true", help="only the per-frame audio cost")
    bench.add_argument(
        "--barge-in", action="store_true", help="the false-barge-in corpus over the agent's reply (section 5)"
    )
    bench.add_argument(
        "--call-control",
        action="store_true",
        help="last mark -> <Hangup/>/<Dial>, and a killed media task -> the agent heard again (section 5)",
    )
    bench.add_argument("--calls", type=int, nargs="*", default=[1, 10, 50], help="simultaneous calls to run")
    bench.add_argument("--out", default="bench-output", help="folder for the JSON results and the logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check()
        if args.command == "demo":
            from pathlib import Path

            from infra.demo import run_demo

            return run_demo(Path(args.out), real=args.real)
        if args.command == "serve":
            return _serve(args.app, args.host, args.port, args.public_url)
        if args.command == "bench":
            from pathlib import Path

            from infra.bench import run

            return run(
                args.calls,
                Path(args.out),
                frames_only=args.frames,
                barge_in=args.barge_in,
                call_control=args.call_control,
            )
        raise AssertionError(f"unknown command {args.command}")
    except ConfigError as error:
        print(f"parley {args.command}: configuration error: {error}", file=sys.stderr)
        return 2


def _serve(app_name: str, host: str, port: int, public_url: str | None = None) -> int:
    from core.server import serve

    if app_name == "both":
        from handlers.local import from_env

        both, both_drain = from_env(public_url)
        serve(both, host, port, both_drain)
    elif app_name == "media":
        from handlers.media import app, drain

        serve(app, host, port, drain)
    else:
        from handlers.webhook import app as webhook_app

        serve(webhook_app, host, port)
    return 0


def _check() -> int:
    import asyncio

    from core.check import run_checks
    from core.config import ProviderSettings, secret_values
    from core.logs import redact_secrets

    settings = ProviderSettings.from_env()
    redact_secrets(secret_values(settings))
    results = asyncio.run(run_checks(settings))
    for result in results:
        print(result.line())
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
