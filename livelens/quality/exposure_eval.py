"""How well :class:`~livelens.quality.exposure.ExposureTracker` finds dark and bright frames in streams.

Each photo of the real-photo set (:mod:`livelens.quality.realset`) stands for one stream, as in
:mod:`livelens.quality.focus_eval`. A window's clean frame is the stream's reference; each test
frame then comes next, on its own copy of that state rebuilt from JSON, as the streams deployment
rebuilds it for every frame.

* positives: darkening and brightening at the set's five levels (where the set applies them: an
  ordinary exposure, :func:`realset.distortable`);
* negatives: the set's benign changes (JPEG, noise, ×0.85 and ×1.15), blur and occluders of the same
  window, and jumps from the centre to another window of the scene (a zoom, its darkest or flattest
  part: the camera turned to a dark coat or a wall is not an exposure change).

Per seed, the photos are split as the quality-flag fit splits them (:func:`realset.photo_splits`);
each threshold is fitted on the training photos (:func:`fit_gain`: the middle of the gap between
negatives and positives where there is one), and the
figures are measured on the held-out photos only, beside the shipped defaults and the per-frame
classical flags (:func:`livelens.quality.assess.assess`) on the same frames. The photos that other
packages ship, which the set does not use, test the shipped defaults; cuts between every pair of
the set's photos and pans with an exposure change in the middle test the stream logic.

Run ``python -m livelens.quality.exposure_eval --out runs/eval-exposure`` (``make eval-exposure``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from livelens.quality import distort as D
from livelens.quality import realset as R
from livelens.quality.exposure import DEFAULT_BRIGHT_GAIN, DEFAULT_DARK_GAIN, ExposureTracker
from livelens.quality.focus import SPECTRUM_WIDTH
from livelens.quality.focus_eval import (
    PAN_LEVELS,
    PAN_PARTS,
    cli,
    fit_threshold,
    fresh_photos,
    level_scores,
    level_table,
    pan_frames,
    stream_frame,
    stream_size,
    through_json,
    write_report,
)

CHANGES = ("dark", "bright")


def photo_rows(photo: str, rgb: np.ndarray, windows: int = 2, classical: bool = True,
               served: Any = None) -> list[dict[str, Any]]:
    """The tracker's answer for one photo's frames (module docstring); with ``served`` (a
    :class:`~livelens.quality.engine.QualityEngine`), also the per-frame flags it serves."""
    from livelens.quality.assess import assess

    items = R.items_for(photo, rgb, windows)
    size = stream_size(rgb, photo)
    states = {}
    for base in R.bases(windows):
        tracker = ExposureTracker()
        tracker.update(stream_frame(R.render(R.Item(photo, base, "none", 0), rgb), size))
        states[base] = json.dumps(tracker.to_dict())
    tests = [(it, "within scene") for it in items if it.distortion in R.LEVELS]
    tests += [(R.Item(photo, base, b, 0), "benign") for base in R.bases(windows) for b in R.BENIGN]
    tests += [(it, "jump") for it in items if it.distortion == "none" and it.base != "centre"]
    rows = []
    for it, case in tests:
        state = states["centre" if case == "jump" else it.base]
        frame = stream_frame(R.render(it, rgb), size)
        out = ExposureTracker.from_dict(json.loads(state)).update(frame)
        row = {"photo": photo, "base": it.base, "distortion": it.distortion, "level": it.level, "case": case,
               "gain": out["gain"], "agreement": out["agreement"], "cut": out["cut"], "change": out["change"]}
        if classical:
            b = assess(frame)["brightness"]
            row["classical"] = {"dark": bool(b["dark"]), "bright": bool(b["bright"])}
        if served is not None:
            b = served.assess(frame)["brightness"]
            row["served"] = {"dark": bool(b["dark"]), "bright": bool(b["bright"])}
        rows.append(row)
    return rows


def change_scores(rows: list[dict[str, Any]], change: str) -> np.ndarray:
    """How far each row's gain went the ``change`` way (log; −inf where there was no verdict)."""
    sign = -1.0 if change == "dark" else 1.0
    return np.array([-np.inf if r["gain"] is None else sign * np.log(r["gain"]) for r in rows], np.float64)


def scores(rows: list[dict[str, Any]], change: str, predicted: np.ndarray) -> dict[str, Any]:
    """:func:`focus_eval.level_scores` for one change, and the false alarms by kind."""
    pos = np.array([r["distortion"] == change for r in rows])
    fp = int((predicted & ~pos).sum())
    out = level_scores(pos, np.array([r["level"] for r in rows]), predicted)
    kinds: dict[str, int] = {}
    for r, p in zip(rows, predicted, strict=True):
        if p and r["distortion"] != change:
            kind = f"jump to {r['base']}" if r["case"] == "jump" else r["distortion"]
            kinds[kind] = kinds.get(kind, 0) + 1
    out["negatives"] = {"n": int((~pos).sum()), "false_alarms": fp, "by_kind": kinds,
                        "photos": sorted({r["photo"] for r, p in zip(rows, predicted, strict=True)
                                          if p and r["distortion"] != change})}
    out["cuts"] = {"positives": int(sum(r["cut"] for r, q in zip(rows, pos, strict=True) if q))}
    return out


def fit_gain(rows: list[dict[str, Any]], change: str, target_precision: float = 0.97) -> float:
    """The gain threshold for ``change`` fitted on ``rows``: the geometric middle between the
    strongest negative and the weakest positive where they are apart (the widest margin both ways),
    else the loosest with precision ≥ ``target_precision`` (:func:`focus_eval.fit_threshold`)."""
    s = change_scores(rows, change)
    pos = np.array([r["distortion"] == change for r in rows])
    neg = s[~pos & np.isfinite(s)]
    hit = s[pos & np.isfinite(s)]
    if len(hit) and (not len(neg) or hit.min() > neg.max()):
        thr = (hit.min() + neg.max()) / 2 if len(neg) else hit.min()
    else:
        thr = fit_threshold(s, pos, target_precision)
    return float(np.exp(-thr if change == "dark" else thr))


def cut_rows(photos: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Every ordered pair of photos as a cut: photo A's clean centre, then photo B's at A's frame
    size. Nothing changed exposure, so every change called is a false alarm."""
    size = (SPECTRUM_WIDTH, round(SPECTRUM_WIDTH * R.FRAME[1] / R.FRAME[0]))
    frames = {n: stream_frame(R.base_frame(rgb, n, "centre"), size) for n, rgb in photos.items()}
    states = {}
    for n, f in frames.items():
        tracker = ExposureTracker()
        tracker.update(f)
        states[n] = tracker.to_dict()
    rows = []
    for a in photos:
        for b in photos:
            if a != b:
                out = ExposureTracker.from_dict(states[a]).update(frames[b])
                rows.append({"from": a, "to": b, "change": out["change"], "cut": out["cut"]})
    return rows


def pan_stream(photo: str, rgb: np.ndarray, change: str, level: int) -> list[dict[str, Any]]:
    """One tracker through a camera pan across a photo (:func:`focus_eval.pan_frames`) whose middle
    part's exposure is changed at ``level``."""
    gain = R.LEVELS[change][level - 1]
    state: dict[str, Any] = {}
    rows = []
    for i, part, frame in pan_frames(rgb, lambda f, _: D.exposure(f, gain)):
        out, state = through_json(ExposureTracker, state, frame)
        rows.append({"photo": photo, "change": change, "level": level, "frame": i, "part": part,
                     "called": out["change"], "cut": out["cut"]})
    return rows


def pan_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per change: changed frames found (the right way), and clean frames called changed."""
    out: dict[str, Any] = {}
    for change in CHANGES:
        sel = [r for r in rows if r["change"] == change]
        hit = [r["called"] == change for r in sel if r["part"] == "changed"]
        fa = [r for r in sel if r["part"] != "changed" and r["called"]]
        clean = sum(r["part"] != "changed" for r in sel)
        out[change] = {"streams": len({(r["photo"], r["level"]) for r in sel}), "changed_frames": len(hit),
                       "found": int(sum(hit)), "recall": round(float(np.mean(hit)) if hit else 0.0, 4),
                       "clean_frames": clean, "false_alarms": len(fa),
                       "false_alarm_photos": sorted({r["photo"] for r in fa}),
                       "cuts": int(sum(r["cut"] for r in sel))}
    return out


def _pannable(rgb: np.ndarray, change: str) -> bool:
    """Whether the set would change this photo's exposure that way (its centre window)."""
    return R.distortable(change, R.base_frame(rgb, "pan", "centre"))


def run(seeds: tuple[int, ...] = (0, 1, 2), windows: int = 2, target_precision: float = 0.97,
        max_photos: int = 0, classical: bool = True, fresh: bool = True, pans: bool = True,
        served: bool = False) -> dict[str, Any]:
    """Every photo's rows, then per seed and change: the threshold fitted on the training photos
    and the held-out figures of the tracker, of the shipped defaults and of the classical flags.

    With ``served``, also the per-frame flags the Quality deployment serves (the shipped learned
    flags, through :class:`~livelens.quality.engine.QualityEngine`), and what a stream's window
    says: the Streams deployment adds the tracker's label to the frame's own, so a frame is
    labelled when either fires."""
    from livelens.quality.flag_training import _photos

    t0 = time.time()
    photos = _photos(max_photos)
    engine = None
    if served:
        from livelens.quality.engine import QualityEngine

        engine = QualityEngine(iqa_ref=None)
    by_photo = {n: photo_rows(n, rgb, windows, classical, engine) for n, rgb in photos.items()}
    shipped = {"dark": DEFAULT_DARK_GAIN, "bright": DEFAULT_BRIGHT_GAIN}
    result: dict[str, Any] = {"photos": sorted(photos), "windows": windows, "target_precision": target_precision,
                              "n_rows": sum(len(v) for v in by_photo.values()), "shipped": shipped, "seeds": {}}
    for seed in seeds:
        train, test = R.photo_splits(sorted(photos), seed)
        tr = [r for n in train for r in by_photo[n]]
        te = [r for n in test for r in by_photo[n]]
        per: dict[str, Any] = {"train_photos": train, "test_photos": test, "n_test": len(te)}
        for change in CHANGES:
            gain = fit_gain(tr, change, target_precision)
            st = change_scores(te, change)
            thr = change_scores([{"gain": gain}], change)[0] - 1e-9
            per[change] = {
                "fitted_gain": round(gain, 4), "tracker": scores(te, change, st >= thr),
                # The tracker's own answer at its default gains: what the streams deployment says.
                "shipped": scores(te, change, np.array([r["change"] == change for r in te])),
                "classical": scores(te, change, np.array([r["classical"][change] for r in te])) if classical else None}

        result["seeds"][str(seed)] = per
    if engine is not None and engine.flags[1]:
        # The served flags were fitted on some of the set's photos (their card lists them): only
        # the others are held out for them, whatever the seed's split.
        seen = {p for d in engine.flags[1]["card"].get("datasets", []) for p in d.get("photos", [])}
        held = [n for n in sorted(photos) if n not in seen]
        rows = [r for n in held for r in by_photo[n]]
        result["served"] = {"model": engine.flags[1]["ref"], "held_out_photos": held, "n": len(rows)}
        for change in CHANGES:
            own = np.array([r["served"][change] for r in rows])
            tracker = np.array([r["change"] == change for r in rows])
            result["served"][change] = {"served": scores(rows, change, own), "tracker": scores(rows, change, tracker),
                                        "window": scores(rows, change, own | tracker)}
    every = [r for v in by_photo.values() for r in v]
    result["all_photos_gain"] = {}
    for change in CHANGES:
        result["all_photos_gain"][change] = round(fit_gain(every, change, target_precision), 4)
    extra = fresh_photos() if fresh else {}
    if extra:
        rows = [r for n, rgb in extra.items() for r in photo_rows(n, rgb, windows, classical)]
        if rows:
            result["fresh"] = {"photos": sorted(extra), "n": len(rows)}
            for change in CHANGES:
                result["fresh"][change] = {
                    "tracker": scores(rows, change, np.array([r["change"] == change for r in rows])),
                    "classical": scores(rows, change, np.array([r["classical"][change] for r in rows]))
                    if classical else None}
    cuts = cut_rows(photos)
    result["cuts"] = {"n": len(cuts), "called": sum(bool(r["change"]) for r in cuts),
                      "seen_as_cut": sum(r["cut"] for r in cuts),
                      "called_into": sorted({r["to"] for r in cuts if r["change"]})[:10]}
    if pans:
        def pan_rows(pool: dict[str, np.ndarray]) -> list[dict[str, Any]]:
            return [r for n, rgb in pool.items() for c in CHANGES if _pannable(rgb, c) for lv in PAN_LEVELS
                    for r in pan_stream(n, rgb, c, lv)]

        result["pans"] = {"set": pan_scores(pan_rows(photos))}
        if fresh and extra:
            result["pans"]["fresh"] = pan_scores(pan_rows(extra))
    result["wall_time_s"] = round(time.time() - t0, 1)
    return result


def to_markdown(result: dict[str, Any]) -> str:
    """Per seed and change: P and R per level, the tracker beside the classical flag."""
    lines = [f"# Exposure changes in streams of held-out real photos ({result['n_rows']} frames of "
             f"{len(result['photos'])} photos, {result['wall_time_s']} s)", ""]
    for seed, s in result["seeds"].items():
        lines += [f"## Seed {seed}: {len(s['test_photos'])} held-out photos ({s['n_test']} frames)", ""]
        for change in CHANGES:
            c = s[change]
            t, sh = c["tracker"], c["shipped"]
            lines += [f"### {change}: gain fitted on {len(s['train_photos'])} training photos {c['fitted_gain']}",
                      "", *level_table(t, c["classical"]), "",
                      f"Tracker false alarms: {t['negatives']['false_alarms']} of {t['negatives']['n']} "
                      f"{t['negatives']['by_kind']} on {', '.join(t['negatives']['photos']) or 'no photo'}; "
                      f"{t['cuts']['positives']} changed frames seen as cuts. At the shipped gain "
                      f"{result['shipped'][change]}: P {sh['all']['precision']:.3f} / R {sh['all']['recall']:.3f}, "
                      f"level 1 P {sh['1']['precision']:.3f} / R {sh['1']['recall']:.3f}, "
                      f"{sh['negatives']['false_alarms']} false alarms", ""]

        lines += [f"Held-out photos: {', '.join(s['test_photos'])}", ""]
    lines += [f"Gains fitted on all {len(result['photos'])} photos: {result['all_photos_gain']} "
              f"(shipped: {result['shipped']})", ""]
    sv = result.get("served")
    if sv:
        lines += [f"## What a stream's window says: the served per-frame flag ({sv['model']}) or the tracker, on "
                  f"the {len(sv['held_out_photos'])} photos that model was not fitted on ({sv['n']} frames)", "",
                  "| change | level | served P | served R | tracker P | tracker R | window P | window R |",
                  "|---|---|---|---|---|---|---|---|"]
        for change in CHANGES:
            c = sv[change]
            for lv in ["all", "1", "2", "3", "4", "5"]:
                lines.append(f"| {change} | {lv} | " + " | ".join(
                    f"{c[k][lv]['precision']:.3f} | {c[k][lv]['recall']:.3f}" for k in ("served", "tracker", "window"))
                    + " |")
        lines += ["", "False alarms: " + "; ".join(
            f"{change} served {sv[change]['served']['negatives']['false_alarms']} "
            f"{sv[change]['served']['negatives']['by_kind']}, window {sv[change]['window']['negatives']['false_alarms']}"
            for change in CHANGES), ""]
    fr = result.get("fresh")
    if fr:
        lines += [f"## Photos outside the set, shipped gains ({fr['n']} frames of {', '.join(fr['photos'])})", ""]
        for change in CHANGES:
            t = fr[change]["tracker"]
            lines += [f"### {change}", "", *level_table(t, fr[change]["classical"]), "",
                      f"Tracker false alarms: {t['negatives']['false_alarms']} of {t['negatives']['n']} "
                      f"{t['negatives']['by_kind']}", ""]
    c = result["cuts"]
    lines += ["## Cuts between the set's photos", "",
              f"{c['n']} cuts (each photo's clean frame, then another photo's): exposure change called "
              f"{c['called']} times, {c['seen_as_cut']} seen as cuts"
              + (f" (called into {', '.join(c['called_into'])})" if c["called"] else ""), ""]
    for pool, pan in (result.get("pans") or {}).items():
        lines += [f"## Pan streams ({'photos of the set' if pool == 'set' else 'photos outside the set'}), "
                  f"shipped gains", ""]
        for change, p in pan.items():
            lines += [f"- {change}: {p['streams']} streams of {sum(PAN_PARTS)} frames (levels "
                      f"{', '.join(map(str, PAN_LEVELS))} in the middle {PAN_PARTS[1]}): found {p['found']} of "
                      f"{p['changed_frames']} changed frames (R {p['recall']:.3f}); clean frames called changed "
                      f"{p['false_alarms']} of {p['clean_frames']} on "
                      f"{', '.join(p['false_alarm_photos']) or 'no photo'}; {p['cuts']} frames seen as cuts"]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = cli(__doc__, "runs/eval-exposure")
    ap.add_argument("--no-served", action="store_true", help="skip the served per-frame flags (the slow part)")
    a = ap.parse_args(argv)
    result = run(tuple(int(s) for s in a.seeds.split(",")), a.windows, a.target_precision, a.max_photos,
                 not a.no_classical, not a.no_fresh, not a.no_pans, not a.no_served)
    write_report(a.out, result, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
