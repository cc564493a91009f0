"""Identity metrics of a generated video against reference faces.

* similarity to reference: cosine between each frame's face embedding and the reference
  (FantasyID's RS, StableAnimator's CSIM, Concat-ID's ArcSim are all this cosine, averaged
  over frames); with several reference faces the reference is the normalised mean of their
  normalised embeddings.
* inter-frame similarity (IFS): cosine between the face embeddings of consecutive frames that
  both have a face, averaged.
* face motion (FM): mean magnitude (pixels per frame) of dense optical flow (Farneback) from the
  previous frame, inside the current frame's face box, averaged over frames.
* frames without a face: counted and listed; they are left out of every average.
"""

import json
import math

import numpy as np
import torch
import torch.nn.functional as F


def reference_vector(ref_embeddings):
    """(M, D) raw or normalised reference embeddings -> (D,) unit vector."""
    r = F.normalize(ref_embeddings.float(), dim=-1).mean(dim=0)
    return F.normalize(r, dim=-1)


def cosine_to_reference(embeddings, ref):
    """(N, D) frame embeddings, (D,) unit reference -> (N,) cosines."""
    if embeddings.shape[0] == 0:
        return torch.zeros(0)
    return F.normalize(embeddings.float(), dim=-1) @ ref.float()


def inter_frame_similarity(embeddings, frame_ids):
    """Cosines between consecutive frames that both have a face: list of (frame, cosine)."""
    e = F.normalize(embeddings.float(), dim=-1)
    out = []
    for k in range(1, len(frame_ids)):
        if frame_ids[k] == frame_ids[k - 1] + 1:
            out.append((int(frame_ids[k]), float(e[k] @ e[k - 1])))
    return out


def flow_magnitude_in_box(prev_gray, gray, box):
    """Mean Farneback flow magnitude (pixels) inside box (x1, y1, x2, y2) of `gray`."""
    import cv2

    h, w = gray.shape
    x1, y1, x2, y2 = box
    xa, ya = max(0, int(math.floor(x1))), max(0, int(math.floor(y1)))
    xb, yb = min(w, int(math.ceil(x2))), min(h, int(math.ceil(y2)))
    if xb - xa < 2 or yb - ya < 2:
        return float("nan")
    # flow on the whole frame (context matters for large motion), read inside the box
    flow = cv2.calcOpticalFlowFarneback(prev_gray, gray, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    mag = np.sqrt((flow[ya:yb, xa:xb] ** 2).sum(-1))
    return float(mag.mean())


def face_motion(frames_gray, boxes):
    """frames_gray: list of (H, W) uint8; boxes: list per frame of (4,) or None -> list of (frame, fm)."""
    out = []
    for t in range(1, len(frames_gray)):
        if boxes[t] is None:
            continue
        v = flow_magnitude_in_box(frames_gray[t - 1], frames_gray[t], boxes[t])
        if not math.isnan(v):
            out.append((t, v))
    return out


def _mean(values):
    return float(np.mean(values)) if len(values) else float("nan")


def summarize(n_frames, frame_ids, cos_ref, ifs, fm, det_scores=None):
    """Numbers + a per-frame table (list of dicts, JSON-able; NaN -> None)."""
    cos_map = {int(f): float(c) for f, c in zip(frame_ids, cos_ref)}
    ifs_map = dict(ifs)
    fm_map = dict(fm)
    score_map = {int(f): float(s) for f, s in zip(frame_ids, det_scores)} if det_scores is not None else {}
    rows = []
    for t in range(n_frames):
        rows.append({
            "frame": t,
            "face": t in cos_map,
            "similarity_to_reference": cos_map.get(t),
            "inter_frame_similarity": ifs_map.get(t),
            "face_motion": fm_map.get(t),
            "det_score": score_map.get(t),
        })
    missing = [t for t in range(n_frames) if t not in cos_map]
    summary = {
        "frames": n_frames,
        "frames_with_face": n_frames - len(missing),
        "frames_without_face": len(missing),
        "frames_without_face_list": missing,
        "similarity_to_reference_mean": _mean(list(cos_map.values())),
        "similarity_to_reference_min": float(min(cos_map.values())) if cos_map else float("nan"),
        "inter_frame_similarity_mean": _mean([v for _, v in ifs]),
        "face_motion_mean": _mean([v for _, v in fm]),
    }
    return summary, rows


def table_json(summary, rows):
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        return v

    return json.dumps(
        {"summary": {k: clean(v) for k, v in summary.items()}, "frames": [{k: clean(v) for k, v in r.items()} for r in rows]},
        indent=1,
    )


def plot_metrics(summary, rows, width=960, height=540):
    """An RGB uint8 (H, W, 3) chart: similarity to reference and IFS per frame (top), face motion
    per frame (bottom), frames without a face marked red, the means written in the title."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=max(12, height // 36))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    n = max(1, len(rows))
    left, right = int(width * 0.08), int(width * 0.97)
    fs = getattr(font, "size", 12)
    top1, bot1 = int(fs * 3.2), int(height * 0.62)
    top2, bot2 = int(height * 0.70), int(height - fs * 2.2)

    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    d.text((left, 4), f"similarity to reference: mean {fmt(summary['similarity_to_reference_mean'])}  "
                      f"min {fmt(summary['similarity_to_reference_min'])}   IFS mean {fmt(summary['inter_frame_similarity_mean'])}", fill=(0, 0, 0), font=font)
    d.text((left, 4 + fs * 1.3), f"face motion mean {fmt(summary['face_motion_mean'])} px/frame   "
                                 f"frames without face: {summary['frames_without_face']} of {summary['frames']}", fill=(0, 0, 0), font=font)

    def xpos(t):
        return left + (right - left) * (t + 0.5) / n

    # panel 1: similarities
    vals = [r["similarity_to_reference"] for r in rows if r["similarity_to_reference"] is not None]
    vals += [r["inter_frame_similarity"] for r in rows if r["inter_frame_similarity"] is not None]
    lo = min([0.0] + vals)
    lo = math.floor(lo * 4) / 4
    hi = 1.0

    def ypos1(v):
        return bot1 - (bot1 - top1) * (v - lo) / (hi - lo)

    d.rectangle([left, top1, right, bot1], outline=(0, 0, 0))
    tick = lo
    while tick <= hi + 1e-9:
        y = ypos1(tick)
        d.line([left, y, right, y], fill=(225, 225, 225))
        d.text((2, y - fs / 2), f"{tick:.2f}", fill=(0, 0, 0), font=font)
        tick += 0.25
    for key, color in (("similarity_to_reference", (31, 119, 180)), ("inter_frame_similarity", (255, 127, 14))):
        pts = [(xpos(r["frame"]), ypos1(r[key])) for r in rows if r[key] is not None]
        for a, b in zip(pts, pts[1:]):
            d.line([a, b], fill=color, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
    for r in rows:
        if not r["face"]:
            x = xpos(r["frame"])
            d.line([x, top1, x, bot1], fill=(214, 39, 40), width=1)
    d.text((right - fs * 16, top1 + 4), "- to reference", fill=(31, 119, 180), font=font)
    d.text((right - fs * 16, top1 + 4 + fs * 1.2), "- inter-frame (IFS)", fill=(255, 127, 14), font=font)
    d.text((right - fs * 16, top1 + 4 + fs * 2.4), "| no face", fill=(214, 39, 40), font=font)

    # panel 2: face motion bars
    fm = [r["face_motion"] for r in rows if r["face_motion"] is not None]
    fmax = max(fm) if fm else 1.0
    fmax = fmax if fmax > 0 else 1.0
    d.rectangle([left, top2, right, bot2], outline=(0, 0, 0))
    d.text((2, top2), f"{fmax:.1f}", fill=(0, 0, 0), font=font)
    d.text((2, bot2 - fs), "0", fill=(0, 0, 0), font=font)
    bw = max(1.0, (right - left) / n * 0.7)
    for r in rows:
        if r["face_motion"] is None:
            continue
        x = xpos(r["frame"])
        y = bot2 - (bot2 - top2) * r["face_motion"] / fmax
        d.rectangle([x - bw / 2, y, x + bw / 2, bot2], fill=(44, 160, 44))
    d.text((left, bot2 + 4), f"face motion (px/frame) per frame; frames 0..{n - 1}", fill=(0, 0, 0), font=font)
    return np.asarray(img, dtype=np.uint8)
