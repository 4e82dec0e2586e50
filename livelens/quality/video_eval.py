"""The quality checks on a real video: Label Studio's sample clip, read in place.

Every other quality figure comes from still photos, and the stream checks were measured on pans
synthesised from them: a rigid shift, nothing in the scene moving. Label Studio ships one real
video, ``opossum_snow.mp4`` (42 s of 1280×720 at 30 fps, in the setup's ``.venv-ls``): a camera
held by hand and strapped to a snowboard, a shaking horizon, cuts, a title card, snow, and an
animal that comes close to the lens. No fit of any quality model and no threshold used it.

Two measurements, both through the serving code:

* **the stream**: a snapshot every ``step`` frames goes through the Streams deployment's own
  code (``Streams._ingest``, with its SQLite store), first the clean clip, then the clip with
  spells of one distortion (snapshots 10–14 of every 20) at levels 1, 3 and 5 of the real-photo
  set (:mod:`livelens.quality.realset`; exposure changes only where the set applies them). Per
  check: spell frames found, false alarms on the other frames, and frames with no verdict (a cut).
  With ``served``, each frame's result is the Quality deployment's answer
  (:class:`~livelens.quality.engine.QualityEngine`), and "the window" counts a frame when the served
  per-frame flag or the stream check raised the label.
* **per frame**: a snapshot every ``frame_step`` frames gets the set's recipe with one window
  (:func:`realset.items_for`: clean, one benign change, five levels of each distortion, the
  darkest and flattest windows), encoded as PNG and answered by ``QualityEngine.assess`` (the
  code of ``/v1/quality``), with the shipped learned flags and with the classical thresholds.
  The clip's own frames count as clean. Some carry real motion blur, which a viewer would call
  blurred; the report lists the clean frames each flag fires on, so they can be looked at.

Run ``python -m livelens.quality.video_eval --out runs/eval-video`` (``make eval-video``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from livelens.quality import realset as R

#: Label Studio's sample video: (package, folder, file).
VIDEO = ("label_studio", "core/static/samples", "opossum_snow.mp4")
#: Snapshots ``SPELL[0]`` to ``SPELL[1] - 1`` of every ``SPELL[2]`` are distorted in a spell stream.
SPELL = (10, 15, 20)
STREAM_DISTORTIONS = ("dark", "bright", "gaussian_blur", "motion_blur")
STREAM_LEVELS = (1, 3, 5)
#: The stream check that must fire on each distortion, and the window label it raises.
CHECK_OF = {"dark": "exposure", "bright": "exposure", "gaussian_blur": "focus", "motion_blur": "focus"}
LABEL_OF = {"dark": "quality_dark", "bright": "quality_bright", "gaussian_blur": "quality_blur",
            "motion_blur": "quality_blur"}
FPS = 30.0


def video_path() -> Path:
    """Where :data:`VIDEO` is installed.

    Raises:
        ConfigError: It is not (``make setup`` installs Label Studio into ``.venv-ls``).
    """
    from livelens.errors import ConfigError
    from livelens.evaluation import package_file

    path = package_file(*VIDEO)
    if path is None:
        raise ConfigError(f"{VIDEO[0]}'s {VIDEO[2]} is not installed: run `make setup`")
    return path


def snapshots(step: int, limit: int = 0, path: Path | None = None) -> list[tuple[int, np.ndarray]]:
    """``(frame index, RGB)`` of every ``step``-th frame of the clip, as the set's 16:9 frame
    (960×540; :func:`realset.base_frame`), at most ``limit`` of them (0: all)."""
    import cv2

    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    cap = cv2.VideoCapture(str(path or video_path()))
    out: list[tuple[int, np.ndarray]] = []
    i = 0
    try:
        while not limit or len(out) < limit:
            ok, bgr = cap.read()
            if not ok:
                break
            if i % step == 0:
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                out.append((i, R.base_frame(rgb, f"{VIDEO[0]}/{VIDEO[2]}", "centre")))
            i += 1
    finally:
        cap.release()
    return out


def in_spell(k: int) -> bool:
    """Whether snapshot ``k`` of a spell stream is distorted."""
    return SPELL[0] <= k % SPELL[2] < SPELL[1]


def stream_rows(frames: list[tuple[int, np.ndarray]], distortion: str, level: int,
                served: Any = None) -> list[dict[str, Any]]:
    """What the Streams deployment answers for each snapshot of one stream (module docstring);
    ``distortion`` ``"none"`` is the clean clip."""
    from serve_apps.streams import Streams, StreamsArgs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        streams = Streams.func_or_class(StreamsArgs(db_path=str(Path(tmp) / "streams.sqlite")))
        for k, (index, frame) in enumerate(frames):
            distorted = (distortion != "none" and in_spell(k)
                         and R.distortable(distortion, frame))
            if distorted:
                frame = R.render(R.Item(f"{VIDEO[2]}#{index}", "centre", distortion, level), frame)
            result = {"decision": "pass", "labels": []}
            if served is not None:
                result = {"labels": served.assess(frame)["labels"]}
            out = streams._ingest("video", frame, result, 1000.0 + index / FPS)
            rows.append({"k": k, "frame": index, "spell": distortion != "none" and in_spell(k),
                         "distorted": distorted, "focus": bool(out["focus"].get("lost")),
                         "focus_cut": bool(out["focus"].get("cut")), "exposure": out["exposure"].get("change"),
                         "exposure_cut": bool(out["exposure"].get("cut")), "frozen": bool(out["frozen"]["frozen"]),
                         "window": sorted(out["window"][-1]["labels"]),
                         "served": None if served is None else sorted(
                             lab["name"] for lab in result["labels"] if lab["name"].startswith("quality_"))})
    return rows


def _called(row: dict[str, Any], distortion: str) -> bool:
    check = CHECK_OF[distortion]
    return row["focus"] if check == "focus" else row["exposure"] == distortion


def stream_scores(rows: list[dict[str, Any]], distortion: str) -> dict[str, Any]:
    """Recall over the distorted frames and false alarms over the others, of the tracker and (with
    served answers) of the window; spell frames the set does not distort count for neither."""
    pos = [r for r in rows if r["distorted"]]
    neg = [r for r in rows if not r["spell"]]
    cut = "focus_cut" if CHECK_OF[distortion] == "focus" else "exposure_cut"
    label = LABEL_OF[distortion]
    out = {"positives": len(pos), "negatives": len(neg),
           "found": sum(_called(r, distortion) for r in pos),
           "false_alarms": sum(_called(r, distortion) for r in neg),
           "no_verdict": sum(r[cut] and not _called(r, distortion) for r in pos)}
    if rows and rows[0]["served"] is not None:
        # The window's entry holds the stream checks' labels and the frame's risky ones; the per-frame
        # quality flags are "pass" labels, so "the window" here is the served flag or the check.
        out |= {"window_found": sum(label in r["window"] or label in r["served"] for r in pos),
                "window_false_alarms": sum(label in r["window"] or label in r["served"] for r in neg),
                "served_found": sum(label in r["served"] for r in pos),
                "served_false_alarms": sum(label in r["served"] for r in neg)}
    return out


def clean_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What each check says on the clean clip: every call is a false alarm."""
    out = {"n": len(rows), "focus": [r["frame"] for r in rows if r["focus"]],
           "dark": [r["frame"] for r in rows if r["exposure"] == "dark"],
           "bright": [r["frame"] for r in rows if r["exposure"] == "bright"],
           "frozen": [r["frame"] for r in rows if r["frozen"]],
           "exposure_cuts": sum(r["exposure_cut"] for r in rows), "focus_cuts": sum(r["focus_cut"] for r in rows)}
    if rows and rows[0]["served"] is not None:
        out["served"] = {lab: [r["frame"] for r in rows if lab in r["served"]]
                         for lab in sorted({lab for r in rows for lab in r["served"]})}
    return out


def frame_rows(frames: list[tuple[int, np.ndarray]], learned: Any, classical: Any) -> list[dict[str, Any]]:
    """The set's frames of each snapshot (one window), answered as uploads by both engines."""
    from livelens.quality.flag_training import answer_row

    return [{**answer_row(it, frame, learned, classical), "frame": index}
            for index, frame in frames for it in R.items_for(f"{VIDEO[2]}#{index}", frame, windows=1)]


def run(step: int = 5, frame_step: int = 30, served: bool = True, limit: int = 0,
        distortions: tuple[str, ...] = STREAM_DISTORTIONS, levels: tuple[int, ...] = STREAM_LEVELS,
        per_frame: bool = True) -> dict[str, Any]:
    """Both measurements (module docstring); ``limit`` caps the snapshots of each."""
    from livelens.quality.engine import QualityEngine
    from livelens.quality.flag_training import table

    t0 = time.time()
    learned = QualityEngine(iqa_ref=None)
    model = (learned.flags[1] or {}).get("ref")
    frames = snapshots(step, limit)
    result: dict[str, Any] = {"video": f"{VIDEO[0]}/{VIDEO[1]}/{VIDEO[2]}", "step": step, "fps": FPS,
                              "snapshots": len(frames), "spell": list(SPELL), "served_model": model if served else None}
    engine = learned if served else None
    result["clean"] = clean_scores(stream_rows(frames, "none", 0, engine))
    result["streams"] = {d: {str(lv): stream_scores(stream_rows(frames, d, lv, engine), d) for lv in levels}
                         for d in distortions}
    if per_frame:
        shots = snapshots(frame_step, limit)
        rows = frame_rows(shots, learned, QualityEngine(iqa_ref=None, flags_ref=None))
        clean = [r for r in rows if r["distortion"] == "none"]
        # The whole snapshot alone (no darkest or flattest window): a window of a 720p video is a
        # crop of a compressed picture, softer than the snapshot it comes from.
        whole = [r for r in rows if r["base"] == "centre"]
        result["per_frame"] = {
            "frame_step": frame_step, "snapshots": len(shots), "frames": len(rows), "model": model,
            "before": table(rows, "before"), "after": table(rows, "after"),
            "whole": {"frames": len(whole), "before": table(whole, "before"), "after": table(whole, "after")},
            "clean_flagged": {f: sorted({f"{r['frame']}:{r['base']}" for r in clean if f in r["after"]})
                              for f in ("dark", "bright", "blur", "occlusion")}}
    result["seconds"] = round(time.time() - t0, 1)
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """The stream table per distortion × level, the clean clip's calls and the per-frame table."""
    from livelens.quality.flag_training import table_lines

    c = result["clean"]
    lines = [f"# Quality checks on a real video ({result['video']})", "",
             f"A snapshot every {result['step']} frames ({result['fps'] / result['step']:.1f} a second), "
             f"{result['snapshots']} snapshots; spells are snapshots {SPELL[0]}–{SPELL[1] - 1} of every {SPELL[2]}. "
             f"Served flags: {result['served_model'] or 'not run'}. {result['seconds']} s.", "",
             "## The clean clip through the Streams deployment", "",
             f"- focus lost on {len(c['focus'])} of {c['n']} snapshots {c['focus']}",
             f"- exposure dark on {len(c['dark'])}, bright on {len(c['bright'])} {c['dark'] + c['bright']}",
             f"- frozen on {len(c['frozen'])}",
             f"- cuts (no verdict): exposure {c['exposure_cuts']}, focus {c['focus_cuts']}"]
    if "served" in c:
        lines += [f"- served per-frame flags: {', '.join(f'{k} {len(v)}' for k, v in c['served'].items()) or 'none'}"]
    lines += ["", "## Spells through the Streams deployment", "",
              "| distortion | level | distorted frames | tracker found | no verdict (cut) | tracker false alarms "
              "| served found / false alarms | window found / false alarms |",
              "|---|---|---|---|---|---|---|---|"]
    for d, per in result["streams"].items():
        for lv, s in per.items():
            served = (f"{s['served_found']} / {s['served_false_alarms']}" if "served_found" in s else "–")
            window = (f"{s['window_found']} / {s['window_false_alarms']}" if "window_found" in s else "–")
            lines.append(f"| {d} | {lv} | {s['positives']} | {s['found']} | {s['no_verdict']} | "
                         f"{s['false_alarms']} of {s['negatives']} | {served} | {window} |")
    if "per_frame" in result:
        p = result["per_frame"]
        lines += ["", f"## Per frame through `QualityEngine.assess` ({p['frames']} frames of {p['snapshots']} "
                  f"snapshots, one every {p['frame_step']} frames; learned: {p['model']})", "",
                  *table_lines(p["before"], p["after"])]
        w = p["whole"]
        lines += ["", f"Whole snapshots only ({w['frames']} frames: no darkest or flattest window), P / R over all levels "
                  "and false alarms, before → after:", ""]
        for f, per in w["after"].items():
            b = w["before"][f]
            lines.append(f"- {f}: {b['all']['precision']:.3f} / {b['all']['recall']:.3f} → "
                         f"{per['all']['precision']:.3f} / {per['all']['recall']:.3f}; false alarms "
                         f"{b['negatives']['false_alarms']} → {per['negatives']['false_alarms']} of {per['negatives']['n']}")
        lines += ["", "Clean and hard-negative frames the learned flags fire on (frame:window):", ""]
        lines += [f"- {f}: {', '.join(v) or 'none'}" for f, v in p["clean_flagged"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    from livelens.quality.focus_eval import write_report

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/eval-video")
    ap.add_argument("--step", type=int, default=5, help="frames between a stream's snapshots")
    ap.add_argument("--frame-step", type=int, default=30, help="frames between per-frame snapshots")
    ap.add_argument("--limit", type=int, default=0, help="at most this many snapshots (0: all)")
    ap.add_argument("--no-served", action="store_true", help="streams without the served per-frame flags")
    ap.add_argument("--no-per-frame", action="store_true")
    a = ap.parse_args(argv)
    result = run(a.step, a.frame_step, not a.no_served, a.limit, per_frame=not a.no_per_frame)
    write_report(a.out, result, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
