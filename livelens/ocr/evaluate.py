"""``make eval-ocr``: both OCR backends side by side on the same images, with mmocr's metrics.

Sets: ICDAR 2015 toy (detection HmeanIOU), real word crops (word/char accuracy), the Chinese
``zh_text`` images with known strings, a held-out generated Chinese line set, and the user-style
text set of :mod:`livelens.ocr.userset` (exact-line accuracy, its ``test`` split by default).
Engines: ``ppocr-alone`` (PP-OCR as rapidocr runs it, none of livelens's fixes), ``ppocr``
(livelens's reading, what ``/v1/ocr`` serves) and ``mmocr``. The user set goes through
:class:`~livelens.ocr.pipeline.OcrPipeline`, the code the Serve deployment runs. Writes
``results.json``, ``report.md`` (the table) and one visualisation per image and engine.

    python -m livelens.ocr.evaluate --out runs/eval-ocr
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from livelens.imageio import load_image
from livelens.ocr.engine import create_engine, draw_lines
from livelens.ocr.metrics import det_metrics, rec_metrics
from livelens.ocr.types import OcrEngine
from livelens.store import user_store

DEFAULT_SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# Known strings of ../shared/data/zh_text (its README): image → text that must be read.
ZH_EXPECTED = {"text_rec.jpg": "韩国小馆", "ch_en_num.jpg": "正品促销", "text_cls.jpg": "怪我咯",
               "img_exif_orientation.jpg": "我是中国人", "empty_black.jpg": ""}


@dataclass
class EvalArgs:
    """Evaluation options."""

    out: str = "runs/eval-ocr"
    shared: str = str(DEFAULT_SHARED)
    engines: tuple[str, ...] = ("ppocr-alone", "ppocr", "mmocr")
    det_ref: str | None = None
    rec_ref: str | None = None
    store: str = field(default_factory=user_store)
    # 100 lines swung the mmocr character recall to 0.654 against 0.812-0.818 on 400 (two seeds).
    heldout: int = 400
    vis: bool = True
    user: int = 400
    user_split: str = "test"


def eval_icdar(engine: OcrEngine, root: Path, vis_dir: Path | None) -> dict[str, float]:
    """HmeanIOU on icdar2015_toy."""
    spec = json.loads((root / "textdet_test.json").read_text())
    preds, gts = [], []
    for item in spec["data_list"]:
        path = root / "imgs" / Path(item["img_path"]).name
        img = load_image(path)
        (lines,) = engine.read([img])
        preds.append(([ln.polygon for ln in lines], [ln.score for ln in lines]))
        gts.append(([np.asarray(i["polygon"], np.float32) for i in item["instances"]],
                    [bool(i["ignore"]) for i in item["instances"]]))
        if vis_dir is not None:
            Image.fromarray(draw_lines(img, lines)).save(vis_dir / f"icdar_{path.stem}.png")
    return det_metrics(preds, gts)


def eval_word_crops(engine: OcrEngine, root: Path) -> dict[str, float]:
    """Word and character accuracy on the real word crops (recognition only)."""
    spec = json.loads((root / "labels.json").read_text())
    crops = [load_image(root / "imgs" / Path(i["img_path"]).name) for i in spec["data_list"]]
    preds = engine.recognize(crops)
    return rec_metrics([(p, i["instances"][0]["text"]) for (p, _), i in zip(preds, spec["data_list"], strict=True)])


def eval_zh_text(engine: OcrEngine, root: Path, vis_dir: Path | None) -> dict[str, Any]:
    """Share of zh_text images whose expected string is read (and nothing on the black frame)."""
    per: dict[str, Any] = {}
    for name, want in ZH_EXPECTED.items():
        img = load_image(root / name)
        (lines,) = engine.read([img])
        texts = [ln.text for ln in lines]
        ok = (not texts) if not want else any(want in t for t in texts)
        per[name] = {"expected": want, "read": texts[:3], "ok": ok}
        if vis_dir is not None:
            Image.fromarray(draw_lines(img, lines)).save(vis_dir / f"zh_{Path(name).stem}.png")
    return {"accuracy": sum(v["ok"] for v in per.values()) / len(per), "images": per}


def eval_user_set(engine: OcrEngine, samples: Sequence[Any]) -> dict[str, Any]:
    """Exact-line accuracy on user-style text through the serving pipeline (:func:`~livelens.ocr.userset.line_accuracy`)."""
    from livelens.ocr.pipeline import OcrPipeline
    from livelens.ocr.userset import line_accuracy

    pipe, detect, recognize = OcrPipeline.local(engine, decode_qr=False)
    reads = [[ln["text"] for ln in pipe.read_sync(s.image, detect, recognize)["lines"]] for s in samples]
    return line_accuracy(samples, reads)


def heldout_lines(n: int, seed: int = 12345) -> list[tuple[np.ndarray, str]]:
    """Generated Chinese/mixed line crops from slots no training run uses."""
    from livelens.data.text import generate_text_lines
    from livelens.imageio import decode_image

    rows = generate_text_lines(20_000_000, n, seed=seed)
    return [(decode_image(r["image_bytes"]), r["texts"][0]["text"]) for r in rows]


def build_engine(name: str, args: EvalArgs) -> tuple[OcrEngine, str]:
    """The engine and a note on its weights."""
    if name == "ppocr-alone":
        from livelens.ocr.engine import PpOcrEngine

        return PpOcrEngine.plain(), "PP-OCRv6 small (rapidocr 3.10 wheel), rapidocr's pipeline"
    if name != "mmocr":
        return create_engine(name), "PP-OCRv6 small (rapidocr 3.10 wheel), livelens's reading"
    from livelens.store import ModelStore

    store = ModelStore(args.store)
    refs = {"det": args.det_ref or newest(store, "ocr_det_"), "rec": args.rec_ref or newest(store, "ocr_rec_")}
    note = ", ".join(f"{k}={v or 'untrained (random init)'}" for k, v in refs.items())
    return create_engine("mmocr", det=refs["det"], rec=refs["rec"], store=args.store), note


def newest(store: Any, prefix: str) -> str | None:
    """The most recently published ``name@version`` whose name starts with ``prefix`` (None if none)."""
    cards = [c for n in store.names() if n.startswith(prefix) for c in [store.card(n)]]
    return max(cards, key=lambda c: c.get("created_at", ""))["ref"] if cards else None


def evaluate(args: EvalArgs) -> dict[str, Any]:
    """Run every set for every engine; write results.json, report.md and visualisations."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shared = Path(args.shared)
    held = heldout_lines(args.heldout) if args.heldout else []
    from livelens.ocr.userset import user_text_set

    user = user_text_set(args.user, args.user_split) if args.user else []
    results: dict[str, Any] = {}
    for name in args.engines:
        t0 = time.time()
        engine, note = build_engine(name, args)
        vis = out / "vis" / name if args.vis else None
        if vis is not None:
            vis.mkdir(parents=True, exist_ok=True)
        res: dict[str, Any] = {"weights": note}
        res["icdar2015_toy"] = eval_icdar(engine, shared / "icdar2015_toy", vis)
        res["word_crops"] = eval_word_crops(engine, shared / "word_crops")
        res["zh_text"] = eval_zh_text(engine, shared / "zh_text", vis)
        if held:
            preds = engine.recognize([c for c, _ in held])
            res["heldout_zh"] = rec_metrics([(p, t) for (p, _), (_, t) in zip(preds, held, strict=True)])
        if user:
            res["user_text"] = eval_user_set(engine, user)
        res["seconds"] = round(time.time() - t0, 1)
        results[name] = res
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=2, default=float))
    (out / "report.md").write_text(markdown(results, len(held), args.user_split), encoding="utf-8")
    return results


def markdown(results: dict[str, Any], n_held: int, user_split: str = "test") -> str:
    """The side-by-side table."""
    names = list(results)
    n_user = next((r["user_text"]["n_lines"] for r in results.values() if "user_text" in r), 0)

    def user(key: str) -> Any:
        return lambda r: r.get("user_text", {}).get(key)

    rows = [
        (f"user text ({user_split} split, {n_user} lines) exact-line acc", user("line_acc")),
        ("user text: tight crops", user("tight_acc")),
        ("user text: padded crops", user("padded_acc")),
        ("user text: single-line images", user("single_acc")),
        ("user text: multi-line banners", user("multi_acc")),
        ("ICDAR15 toy det hmean (HmeanIOU)", lambda r: r["icdar2015_toy"].get("hmean")),
        ("ICDAR15 toy det precision", lambda r: r["icdar2015_toy"].get("precision")),
        ("ICDAR15 toy det recall", lambda r: r["icdar2015_toy"].get("recall")),
        ("word_crops word acc (exact)", lambda r: r["word_crops"].get("word_acc")),
        ("word_crops word acc (ignore case+symbol)", lambda r: r["word_crops"].get("word_acc_ignore_case_symbol")),
        ("word_crops char recall", lambda r: r["word_crops"].get("char_recall")),
        ("zh_text expected strings read", lambda r: r["zh_text"]["accuracy"]),
        (f"held-out generated lines word acc (n={n_held})", lambda r: r.get("heldout_zh", {}).get("word_acc")),
        ("held-out generated lines char recall", lambda r: r.get("heldout_zh", {}).get("char_recall")),
        ("wall time (s)", lambda r: r["seconds"]),
    ]
    lines = ["# OCR evaluation", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, get in rows:
        cells = []
        for n in names:
            v = get(results[n])
            cells.append("–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Weights: " + "; ".join(f"**{n}**: {results[n]['weights']}" for n in names), ""]
    for n in names:
        lines.append(f"zh_text ({n}): " + ", ".join(
            f"{k} {'✓' if v['ok'] else '✗'} {v['read'][:1]}" for k, v in results[n]["zh_text"]["images"].items()))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> EvalArgs:
    """Command-line flags onto :class:`EvalArgs`."""
    base = EvalArgs()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=base.out)
    p.add_argument("--shared", default=base.shared)
    p.add_argument("--engines", default=",".join(base.engines))
    p.add_argument("--det-ref", default=None)
    p.add_argument("--rec-ref", default=None)
    p.add_argument("--store", default=base.store)
    p.add_argument("--heldout", type=int, default=base.heldout)
    p.add_argument("--no-vis", action="store_true")
    p.add_argument("--user", type=int, default=base.user, help="user-style text images (0: skip the set)")
    p.add_argument("--user-split", default=base.user_split, choices=("val", "test"))
    a = p.parse_args(argv)
    return EvalArgs(a.out, a.shared, tuple(e for e in a.engines.split(",") if e), a.det_ref, a.rec_ref, a.store,
                    a.heldout, not a.no_vis, a.user, a.user_split)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    evaluate(args)
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
