"""Held-out per-label accuracy of the moderation path: classifier alone, OCR alone, and fused.

    python -m train_jobs.eval_safety                          # make eval-safety: safety@latest, test split
    python -m train_jobs.eval_safety --model safety@1 --limit 50

Writes ``runs/eval_safety/{fused.md,fused.json}``. The figures are the ones ``/v1/analyze`` gives,
because the fusion is the gateway's (see ``livelens.train.fused_eval``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from livelens.errors import LivelensError


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``make eval-safety``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="runs/data/frames")
    p.add_argument("--model", default="safety", help="name or name@version, looked up in the store chain")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default="runs/eval_safety")
    p.add_argument("--regions", default="ads_regions",
                   help="text-region model in the store chain, as the OCR deployment uses it; '' leaves it out")
    a = p.parse_args(argv)
    from livelens.models.io import load_from_store
    from livelens.store import ModelStore
    from livelens.train.fused_eval import evaluate_fused, format_fused_table, make_ocr_labeler
    from serve_apps.common import find_in_stores

    try:
        found = find_in_stores(a.model)
        if found is None:
            print(f"error: no model {a.model!r} in the store chain", file=sys.stderr)
            return 2
        store = ModelStore(found[0])
        card = store.card(found[1])
        model = load_from_store(store, found[1])
        regions, regions_ref = None, None
        if a.regions:
            from livelens.evidence.regions import load_region_model

            where = find_in_stores(a.regions)
            if where is None:
                print(f"error: no region model {a.regions!r} in the store chain (or pass --regions '')", file=sys.stderr)
                return 2
            regions, regions_ref = load_region_model(ModelStore(where[0]), where[1]), where[1]
        result = evaluate_fused(model, a.manifest, groups=card["groups"], size=int(card["input_size"]),
                                ocr_labeler=make_ocr_labeler(region_model=regions), split=a.split, limit=a.limit,
                                progress=lambda d, n: print(f"[eval-safety] {d}/{n}", file=sys.stderr, flush=True))
    except LivelensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["model"] = found[1]
    result["regions_model"] = regions_ref
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_fused_table(result)
    (out / "fused.json").write_text(json.dumps(result, indent=2))
    head = f"{found[1]}" + (f" + {regions_ref}" if regions_ref else "")
    (out / "fused.md").write_text(f"{head} on {a.manifest} split {a.split} ({result['rows']} frames)\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
