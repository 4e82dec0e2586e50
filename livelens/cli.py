"""The ``livelens`` command: ``livelens analyze frame.jpg`` or ``livelens analyze frames/`` (with progress).

The URL and key come from ``--url``/``--key`` or ``LIVELENS_URL``/``LIVELENS_API_KEY``. One JSON
line per image goes to stdout (or ``--out``); the progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from livelens.client import ApiError, Client, iter_images


def _summary(res: dict) -> str:
    labels = [f"{lab['name']}={lab['score']:.2f}({lab['decision']})" for lab in res.get("labels", [])[:5]]
    return f"{res.get('decision', '?')}  {' '.join(labels)}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livelens", description="Client of the livelens image-recognition API")
    p.add_argument("--url", default=os.environ.get("LIVELENS_URL", "http://127.0.0.1:8000"))
    p.add_argument("--key", default=os.environ.get("LIVELENS_API_KEY"), help="API key (printed by make run)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for task in ("analyze", "moderate", "ocr", "quality"):
        s = sub.add_parser(task, help=f"{task} an image or every image of a folder")
        s.add_argument("path", type=Path)
        s.add_argument("--evidence", default="boxes", choices=["none", "boxes", "heatmap", "polygons"])
        s.add_argument("--out", type=Path, default=None, help="write JSON lines here instead of stdout")
    sub.add_parser("models", help="which models are served")
    sub.add_parser("health", help="is the service up")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with Client(args.url, api_key=args.key) as client:
        try:
            if args.cmd in ("models", "health"):
                print(json.dumps(client.models() if args.cmd == "models" else client.health(), indent=2))
                return 0
            if not args.path.exists():
                print(f"livelens: no such file or folder: {args.path}", file=sys.stderr)
                return 2
            out = args.out.open("w", encoding="utf-8") if args.out else sys.stdout
            try:
                if args.path.is_file():
                    res = client._post_image(f"/v1/{args.cmd}", args.path, args.evidence)
                    out.write(json.dumps({"path": str(args.path), **res}) + "\n")
                    if args.out:
                        print(_summary(res), file=sys.stderr)
                    return 0
                return _folder(client, args, out)
            finally:
                if args.out:
                    out.close()
        except ApiError as exc:
            print(f"livelens: {exc}", file=sys.stderr)
            return 1


def _folder(client: Client, args: argparse.Namespace, out) -> int:
    from tqdm import tqdm

    paths = iter_images(args.path)
    failed = 0
    with tqdm(total=len(paths), unit="img", file=sys.stderr, desc=args.cmd) as bar:
        for path in paths:
            try:
                res = client._post_image(f"/v1/{args.cmd}", path, args.evidence)
                out.write(json.dumps({"path": str(path), **res}) + "\n")
                bar.set_postfix_str(res.get("decision", ""))
            except ApiError as exc:
                failed += 1
                out.write(json.dumps({"path": str(path), "error": exc.to_dict(), "status": exc.http_status}) + "\n")
            bar.update(1)
    print(f"{len(paths) - failed}/{len(paths)} images analysed, {failed} errors", file=sys.stderr)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
