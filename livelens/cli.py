"""The ``livelens`` command: the HTTP API from a shell, and ``ray job submit`` for the project's jobs.

    livelens analyze frame.jpg                      # one JSON answer
    livelens moderate frames/ --out answers.jsonl   # a folder: batches, in parallel, then a summary
    livelens taxonomy                               # categories and labels
    livelens jobs submit safety -- --epochs 3       # a training job on the cluster (livelens.jobs)

Options go before or after the subcommand. The URL and key come from ``--url``/``--key`` or the
environment (``LIVELENS_URL``, ``LIVELENS_API_KEY``); jobs find the cluster through ``--address``
or ``RAY_ADDRESS`` and authenticate with ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``.

Exit codes: 0 all answered; 1 some images failed (the summary says which kinds); 2 a usage error;
3 the service could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from livelens.client import DEFAULT_URL, ROUTES, ApiError, Client, ServiceUnreachableError, iter_images
from livelens.errors import LivelensError
from livelens.moderation import EVIDENCE_MODES

EPILOG = """environment:
  LIVELENS_URL       the service URL (default http://127.0.0.1:8000; `make run` prints it)
  LIVELENS_API_KEY   the API key (`make run` prints a development key)
  RAY_ADDRESS        the cluster for `livelens jobs` (its dashboard URL, http://HOST:8265)
  RAY_AUTH_TOKEN     the cluster's token for `livelens jobs` (else ~/.ray/auth_token)
exit codes: 0 ok, 1 some images failed, 2 usage error, 3 service unreachable
"""
EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """--url/--key/--timeout, on the main parser (with defaults) and on every subcommand.

    On a subcommand the defaults are suppressed, so a value given there overrides one given
    before it, and leaving it out keeps the main parser's.
    """
    default = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    parser.add_argument("--url", default=default(os.environ.get("LIVELENS_URL", DEFAULT_URL)),
                        help="service URL (env LIVELENS_URL)")
    parser.add_argument("--key", default=default(os.environ.get("LIVELENS_API_KEY")),
                        help="API key (env LIVELENS_API_KEY)")
    parser.add_argument("--timeout", type=float, default=default(120.0), help="seconds per request")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livelens", description="Client of the livelens image-recognition API",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_options(p, suppress=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    for task in ROUTES:
        s = sub.add_parser(task, help=f"{task} an image or every image of a folder", epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("path", type=Path, help="an image file, or a folder (searched recursively)")
        s.add_argument("--evidence", default="boxes", choices=EVIDENCE_MODES)
        s.add_argument("--min-confidence", type=float, default=None, help="leave out labels scoring below this")
        s.add_argument("--categories", default=None, help="comma-separated categories (see `livelens taxonomy`)")
        s.add_argument("--model", default=None, help="pin the safety model version, e.g. safety@1")
        s.add_argument("--out", type=Path, default=None, help="write JSON lines here instead of stdout")
        s.add_argument("--concurrency", type=int, default=4, help="requests in flight (folders)")
        s.add_argument("--batch-size", type=int, default=8, help="images per /batch request (folders; 1..32)")
        _connection_options(s, suppress=True)
    for name, text in (("models", "which models are served"), ("health", "is the service up"),
                       ("taxonomy", "categories and labels, with thresholds")):
        _connection_options(sub.add_parser(name, help=text), suppress=True)
    from livelens.jobs import add_jobs_parser

    add_jobs_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `livelens jobs submit safety --wait -- --epochs 3`: what follows `--` belongs to the job, so it
    # is split off before argparse, which would otherwise read the job's flags as ours.
    job_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, job_args = argv[:cut], argv[cut + 1:]
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse's usage errors exit 2 already; keep --help's 0
        return int(exc.code or 0)
    args.job_args = job_args
    if job_args and args.cmd != "jobs":
        print("livelens: '--' and flags after it are only for `livelens jobs submit`", file=sys.stderr)
        return EXIT_USAGE
    if args.cmd == "jobs":
        from livelens.jobs import run_cli

        return run_cli(args)
    if args.cmd in ROUTES and not (1 <= args.batch_size <= 32 and args.concurrency >= 1):
        print("livelens: --batch-size must be 1..32 and --concurrency at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Client(args.url, api_key=args.key, timeout_s=args.timeout) as client:
            if args.cmd in ("models", "health", "taxonomy"):
                call = {"models": client.models, "health": client.health, "taxonomy": client.taxonomy}[args.cmd]
                print(json.dumps(call(), indent=2, ensure_ascii=False))
                return 0
            if not args.path.exists():
                print(f"livelens: no such file or folder: {args.path}", file=sys.stderr)
                return EXIT_USAGE
            out = args.out.open("w", encoding="utf-8") if args.out else sys.stdout
            try:
                if args.path.is_file():
                    return _one(client, args, out)
                return _folder(client, args, out)
            finally:
                if args.out:
                    out.close()
    except ServiceUnreachableError as exc:
        print(f"livelens: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except LivelensError as exc:
        print(f"livelens: {exc}", file=sys.stderr)
        return EXIT_FAILED if isinstance(exc, ApiError) else EXIT_USAGE


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"min_confidence": args.min_confidence, "categories": args.categories, "model": args.model}


def _one(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    res = client._post_image(ROUTES[args.cmd], args.path, args.evidence, **_options(args))
    out.write(json.dumps({"path": str(args.path), **res}, ensure_ascii=False) + "\n")
    if args.out:
        print(_line(res), file=sys.stderr)
    return 0


def _line(res: dict) -> str:
    labels = [f"{lab['name']}={lab['score']:.2f}({lab['decision']})" for lab in res.get("labels", [])[:5]]
    return f"{res.get('decision', '?')}  {' '.join(labels)}"


def _folder(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Every image of a folder through the /batch route, ``--concurrency`` batches at a time.

    A batch that fails as a whole (e.g. 413 for its total size) is retried image by image, so one
    bad file costs only its own answer. Lines are written in the folder's order.
    """
    from tqdm import tqdm

    paths = iter_images(args.path)
    if not paths:
        print(f"livelens: no images under {args.path} (suffixes: .jpg .jpeg .png .webp .bmp .gif)", file=sys.stderr)
        return EXIT_USAGE
    chunks = [paths[i:i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    opts = _options(args)

    def send(chunk: list[Path]) -> list[tuple[Path, dict]]:
        try:
            items = client.batch(args.cmd, chunk, args.evidence, **opts)
            return list(zip(chunk, items, strict=True))
        except ApiError:
            pass
        results = []
        for path in chunk:
            try:
                results.append((path, {"status": 200, **client._post_image(ROUTES[args.cmd], path, args.evidence,
                                                                          **opts)}))
            except ApiError as exc:
                results.append((path, {"status": exc.http_status, "error": exc.to_dict()}))
        return results

    summary = Summary()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool, \
            tqdm(total=len(paths), unit="img", file=sys.stderr, desc=args.cmd) as bar:
        for results in pool.map(send, chunks):
            for path, item in results:
                out.write(json.dumps({"path": str(path), **item}, ensure_ascii=False) + "\n")
                summary.add(item)
                bar.update(1)
    summary.seconds = time.perf_counter() - t0
    print(summary.table(), file=sys.stderr)
    return 0 if summary.failed == 0 else EXIT_FAILED


class Summary:
    """Counts of a folder run: decisions of the answered images, errors by status and code."""

    def __init__(self) -> None:
        self.decisions: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.seconds = 0.0

    def add(self, item: dict) -> None:
        if item.get("status", 200) == 200 and "error" not in item:
            self.decisions[item.get("decision", "?")] += 1
        else:
            err = item.get("error") or {}
            self.errors[f"{item.get('status', '?')} {err.get('code', '?')}"] += 1

    @property
    def answered(self) -> int:
        return sum(self.decisions.values())

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def table(self) -> str:
        total = self.answered + self.failed
        rows = [("images", str(total)), ("answered", str(self.answered)), ("failed", str(self.failed))]
        rows += [(f"  decision {k}", str(v)) for k, v in sorted(self.decisions.items())]
        rows += [(f"  error {k}", str(v)) for k, v in sorted(self.errors.items())]
        rate = total / self.seconds if self.seconds > 0 else 0.0
        rows.append(("seconds", f"{self.seconds:.1f} ({rate:.1f} images/s)"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    sys.exit(main())
