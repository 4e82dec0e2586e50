"""Held-out precision and recall of the service's answers, per label: fused, each source alone, each left out.

    python -m train_jobs.eval_safety                          # make eval-safety: test split of runs/data/frames
    python -m train_jobs.eval_safety --model safety@1 --limit 50
    python -m train_jobs.eval_safety --real-photos            # make eval-real: false positives on real photos

Writes ``runs/eval_safety/{fused.md,fused.json}`` (and ``real_photos.{md,json}``). The figures are
``/v1/analyze``'s: :class:`livelens.analyzer.LocalAnalyzer` runs the deployments' engines and the
gateway's fusion (``livelens.evaluation``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from livelens.errors import LivelensError


def _real_photos_table(res: dict) -> str:
    lines = [f"{res['photos']} real photos without overlays, each as PNG and JPEG ({res['images']} answers): "
             f"a review or block label fired on {res['any_rate']:.1%} (goal <= 1%). Decisions: {res['decisions']}.",
             "", "| label | fired | rate | examples |", "|---|---:|---:|---|"]
    for lab, e in res["per_label"].items():
        lines.append(f"| {lab} | {e['fired']} | {e['rate']:.1%} | {', '.join(e['examples'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``make eval-safety``, ``make eval-real``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="runs/data/frames")
    p.add_argument("--model", default="safety", help="name or name@version, looked up in the store chain")
    p.add_argument("--regions", default="ads_regions", help="text-region model in the store chain; '' leaves it out")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--evidence", default="boxes", help="evidence mode of the requests measured (boxes: the default)")
    p.add_argument("--real-photos", action="store_true", help="false positives on real photos instead")
    p.add_argument("--out", default="runs/eval_safety")
    a = p.parse_args(argv)
    from livelens.analyzer import LocalAnalyzer
    from livelens.evaluation import evaluate_service, format_table, real_photo_false_positives, real_photos

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        analyzer = LocalAnalyzer(safety_ref=a.model, regions_ref=a.regions or None, evidence=a.evidence)
        if a.real_photos:
            photos = real_photos()
            res = real_photo_false_positives(analyzer, photos, progress=lambda d, n: print(
                f"[eval-real] {d}/{n}", file=sys.stderr, flush=True))
            res["models"] = analyzer.models()
            table = _real_photos_table(res)
            (out / "real_photos.json").write_text(json.dumps(res, indent=2))
            (out / "real_photos.md").write_text(f"{', '.join(res['models'])}\n\n{table}\n")
            print(table)
            return 0
        result = evaluate_service(analyzer, a.manifest, split=a.split, limit=a.limit,
                                  progress=lambda d, n: print(f"[eval-safety] {d}/{n}", file=sys.stderr, flush=True))
    except LivelensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = format_table(result)
    (out / "fused.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "fused.md").write_text(f"{', '.join(result['models'])} on {a.manifest} split {a.split} "
                                  f"({result['rows']} frames; {result['threshold_rule']})\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
