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


# ---------------------------------------------------------------------------------------------
# Benchmark protocols: FaceSim-Arc / FaceSim-Cur as ConsisID's eval (eval/get_facesim_fid.py) and
# OpenS2V-Eval (eval/get_facesim.py) compute them. Both scripts share every step except the frame
# count and how the per-frame scores are averaged:
#   * frames: np.linspace(0, T - 1, n, dtype=int) (truncation; repeats when T < n), ConsisID n = 16,
#     OpenS2V n = 32;
#   * faces: insightface FaceAnalysis (default pack buffalo_l), det size 320, threshold 0.5, the
#     largest box (sorted by area, the last of equal areas); if none, the frame padded by 25 % of
#     its height/width on each side with grey 128 is tried, and its landmarks moved back;
#   * Arc: FaceAnalysis' embedding, i.e. norm_crop(112) of the image the face was found in (the
#     padded one after a retry) through the pack's recogniser; cosine to the reference's;
#   * Cur: norm_crop(224) of the unpadded frame, BGR -> RGB, cv2.resize to 112 (bilinear),
#     x / 255 - 0.5 over 0.5, CurricularFace IR-101, embedding / its L2 norm; cosine;
#   * per frame max(0, cos); frames without a face are skipped; a mean over the kept scores, 0.0
#     when none is kept.
# OpenS2V's quirk: it keeps a Cur score only `if cur_score != 0.0` but an Arc score `if arc_scores
# != 0.0` (the list, always true), so clipped Cur zeros leave the Cur mean while Arc zeros count.
# ConsisID keeps both. The reference image goes through the same steps (one face, pad-and-retry).

BENCHMARKS = {
    "consisid": {"frames": 16, "drop_zero_cur": False, "drop_zero_arc": False},
    "opens2v": {"frames": 32, "drop_zero_cur": True, "drop_zero_arc": False},
}
PROTOCOLS = ("likeness", "consisid", "opens2v")
BENCH_DET_SIZE = 320
BENCH_DET_THRESHOLD = 0.5
PAD_SCALE = 1.25
PAD_GREY = 128
CUR_CROP = 224
CUR_INPUT = 112


def uniform_frame_indices(total, num):
    """The benchmarks' frame choice: np.linspace(0, total - 1, num) truncated to int (repeats kept)."""
    return [int(i) for i in np.linspace(0, total - 1, num, dtype=int)]


def pad_grey(bgr, scale=PAD_SCALE):
    """Pad by int(h * (scale - 1)) rows top and bottom and int(w * (scale - 1)) columns left and right,
    grey 128. Returns (padded, (left, top))."""
    h, w = bgr.shape[:2]
    top = int(h * (scale - 1.0))
    left = int(w * (scale - 1.0))
    out = np.full((h + 2 * top, w + 2 * left, 3), PAD_GREY, dtype=np.uint8)
    out[top:top + h, left:left + w] = bgr
    return out, (left, top)


def largest_index(boxes):
    """Index of the largest box; among equal areas the last one (a stable ascending sort's [-1])."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return int(len(area) - 1 - np.argmax(area[::-1]))


def benchmark_detect(detector, bgr, all_faces=False):
    """Faces as the benchmarks find them: [(det_image, kps in det_image, kps in bgr, box in bgr, score)],
    the largest only unless all_faces. Empty when neither the frame nor its padded copy has a face."""
    boxes, kps = detector.detect(bgr, BENCH_DET_SIZE, BENCH_DET_THRESHOLD)
    image, shift = bgr, np.zeros(2, np.float32)
    if len(boxes) == 0:
        image, (left, top) = pad_grey(bgr)
        boxes, kps = detector.detect(image, BENCH_DET_SIZE, BENCH_DET_THRESHOLD)
        shift = np.array([left, top], np.float32)
        if len(boxes) == 0:
            return []
    order = range(len(boxes)) if all_faces else [largest_index(boxes)]
    out = []
    for k in order:
        box = boxes[k, :4] - np.concatenate([shift, shift])
        out.append((image, kps[k], kps[k] - shift, box, float(boxes[k, 4])))
    return out


def norm_crop(bgr, kps, size):
    """insightface's ArcFace alignment (similarity transform to the template, cv2.warpAffine, black border)."""
    from insightface.utils import face_align

    return face_align.norm_crop(bgr, landmark=np.asarray(kps, dtype=np.float32), image_size=size)


def arc_crops(faces, size=112):
    return [norm_crop(f[0], f[1], size) for f in faces]


def cur_crops(frames_bgr, faces):
    """(N, 3, 112, 112) uint8-valued RGB: norm_crop 224 of the unpadded frame, to RGB, resized to 112."""
    import cv2

    out = []
    for bgr, f in zip(frames_bgr, faces):
        rgb = cv2.cvtColor(norm_crop(bgr, f[2], CUR_CROP), cv2.COLOR_BGR2RGB)
        out.append(np.transpose(cv2.resize(rgb, (CUR_INPUT, CUR_INPUT)), (2, 0, 1)))
    return torch.from_numpy(np.stack(out)) if out else torch.zeros(0, 3, CUR_INPUT, CUR_INPUT, dtype=torch.uint8)


@torch.no_grad()
def cur_embeddings(recognizer, crops, batch_size=64):
    """CurricularFace embeddings, L2-normalised, of (N, 3, 112, 112) uint8 RGB crops, in batches."""
    from .curricularface import normalise_uint8_rgb

    net = recognizer.net
    p = next(net.parameters())
    outs = []
    for s in range(0, crops.shape[0], max(1, int(batch_size))):
        # contiguous NCHW: the scripts' single-image tensor takes the plain NCHW kernels, not channels-last ones
        x = normalise_uint8_rgb(crops[s:s + max(1, int(batch_size))]).contiguous().to(device=p.device, dtype=p.dtype)
        outs.append(net(x).float().cpu())
    if not outs:
        return torch.zeros(0, 512)
    e = torch.cat(outs)
    return e / torch.linalg.vector_norm(e, dim=-1, keepdim=True)


def clipped_cosines(embeddings, ref):
    """max(0, cos) of (N, D) rows against (D,), as the scripts do it (torch cosine_similarity, fp32)."""
    if embeddings.shape[0] == 0:
        return []
    cos = F.cosine_similarity(ref.float().unsqueeze(0), embeddings.float(), dim=-1)
    return [max(0.0, float(c)) for c in cos]


def benchmark_mean(scores, drop_zero):
    kept = [s for s in scores if not (drop_zero and s == 0.0)]
    return float(np.mean(kept)) if kept else 0.0


# ---------------------------------------------------------------------------------------------
# Several identities, drift, gate


def assign_faces(cos, threshold):
    """Greedy one-to-one assignment of faces (rows) to references (columns) by descending cosine,
    keeping pairs >= threshold. Returns {reference: face}."""
    pairs = sorted(((float(cos[i, j]), i, j) for i in range(cos.shape[0]) for j in range(cos.shape[1])), reverse=True)
    used_f, out = set(), {}
    for c, i, j in pairs:
        if c < threshold or i in used_f or j in out:
            continue
        out[j] = i
        used_f.add(i)
    return out


def per_second(frame_ids, values, fps):
    """[(second, mean of the values of frames in [s * fps, (s + 1) * fps)), ...] for seconds with a value."""
    buckets = {}
    for t, v in zip(frame_ids, values):
        if v is None or not math.isfinite(v):
            continue
        buckets.setdefault(int(math.floor(t / fps)), []).append(v)
    return [(s, float(np.mean(buckets[s]))) for s in sorted(buckets)]


def drift(frame_ids, values, fps, n_frames):
    """Mean over the last second (frames t >= n_frames - fps) / mean over the first (t < fps);
    NaN when either has no value or the first is 0."""
    first = [v for t, v in zip(frame_ids, values) if v is not None and math.isfinite(v) and t < fps]
    last = [v for t, v in zip(frame_ids, values) if v is not None and math.isfinite(v) and t >= n_frames - fps]
    if not first or not last or float(np.mean(first)) == 0.0:
        return float("nan")
    return float(np.mean(last)) / float(np.mean(first))


def gate(value, threshold):
    """Pass when the value is a finite number at or above the threshold."""
    return bool(value is not None and math.isfinite(value) and value >= threshold)


def _bgr_frames(rgb):
    from .face_embed import to_bgr_uint8

    return [to_bgr_uint8(rgb[t]) for t in range(rgb.shape[0])]


def benchmark_reference(detector, recognizer, reference_rgb, batch_size=64):
    """Each reference image -> (arc embedding (D,), cur embedding (E,) or None): its largest face
    (pad-and-retry), as the scripts process the reference image."""
    bgr = _bgr_frames(reference_rgb)
    faces = []
    for i, img in enumerate(bgr):
        found = benchmark_detect(detector, img)
        if not found:
            raise ValueError(
                f"'reference_image' image {i} (counting from 0) has no face, also after the benchmarks' grey padding retry; "
                "the benchmark scripts skip such a sample. Use a photo with a clear, frontal face."
            )
        faces.append(found[0])
    arc = torch.from_numpy(detector.embed_bgr(arc_crops(faces, detector.rec_input_size), batch_size=batch_size))
    cur = cur_embeddings(recognizer, cur_crops(bgr, faces), batch_size) if recognizer is not None else None
    return arc, cur


def benchmark_scores(protocol, detector, recognizer, video_rgb, ref_arc, ref_cur=None, several=False,
                     match_threshold=0.3, batch_size=64):
    """Score a video the way `protocol` does. ref_arc (M, D), ref_cur (M, E) or None.

    Returns {"indices": sampled frame indices, "frames": [per sampled frame: {"frame", "face",
    "arc", "cur", "identities": {m: {"arc", "cur"}}}], "facesim_arc", "facesim_cur",
    "identities": [{"facesim_arc", "facesim_cur", "found", "missing"}]}. With one reference and
    several=False the numbers are the benchmark's; with several references every face is scored
    and each is assigned to its best reference (greedy by Arc cosine, >= match_threshold)."""
    spec = BENCHMARKS[protocol]
    idx = uniform_frame_indices(video_rgb.shape[0], spec["frames"])
    bgr_all = _bgr_frames(video_rgb[sorted(set(idx))])
    by_index = dict(zip(sorted(set(idx)), bgr_all))
    frames_bgr, faces, owner = [], [], []
    for k, t in enumerate(idx):
        found = benchmark_detect(detector, by_index[t], all_faces=several)
        for f in found:
            frames_bgr.append(by_index[t])
            faces.append(f)
            owner.append(k)
    size = detector.rec_input_size
    arc = torch.from_numpy(detector.embed_bgr(arc_crops(faces, size), batch_size=batch_size)) if faces else torch.zeros(0, ref_arc.shape[1])
    cur = cur_embeddings(recognizer, cur_crops(frames_bgr, faces), batch_size) if (recognizer is not None and faces) else None
    m = ref_arc.shape[0]
    arc_cos = F.cosine_similarity(arc.float().unsqueeze(1), ref_arc.float().unsqueeze(0), dim=-1) if faces else torch.zeros(0, m)
    cur_cos = (F.cosine_similarity(cur.float().unsqueeze(1), ref_cur.float().unsqueeze(0), dim=-1)
               if cur is not None and ref_cur is not None else None)
    rows = [{"frame": t, "face": False, "arc": None, "cur": None, "identities": {}} for t in idx]
    for k in range(len(idx)):
        mine = [i for i, o in enumerate(owner) if o == k]
        if not mine:
            continue
        rows[k]["face"] = True
        if several:
            got = assign_faces(arc_cos[mine], match_threshold)
            got = {j: mine[i] for j, i in got.items()}
        else:
            got = {0: mine[0]}
        for j, i in got.items():
            a = max(0.0, float(arc_cos[i, j]))
            c = max(0.0, float(cur_cos[i, j])) if cur_cos is not None else None
            rows[k]["identities"][j] = {"arc": a, "cur": c}
        if not several:
            rows[k]["arc"] = rows[k]["identities"][0]["arc"]
            rows[k]["cur"] = rows[k]["identities"][0]["cur"]
    idents = []
    for j in range(m):
        a = [r["identities"][j]["arc"] for r in rows if j in r["identities"]]
        c = [r["identities"][j]["cur"] for r in rows if j in r["identities"] and r["identities"][j]["cur"] is not None]
        idents.append({
            "facesim_arc": benchmark_mean(a, spec["drop_zero_arc"]),
            "facesim_cur": benchmark_mean(c, spec["drop_zero_cur"]) if cur_cos is not None else float("nan"),
            "found": len(a),
            "missing": len(idx) - len(a),
        })
    if several:
        for r in rows:  # the frame's value: the mean over the identities found in it
            if r["identities"]:
                r["arc"] = float(np.mean([v["arc"] for v in r["identities"].values()]))
                cs = [v["cur"] for v in r["identities"].values() if v["cur"] is not None]
                r["cur"] = float(np.mean(cs)) if cs else None
    fa = float(np.mean([d["facesim_arc"] for d in idents]))
    fc = float(np.mean([d["facesim_cur"] for d in idents])) if cur_cos is not None else float("nan")
    return {"indices": idx, "frames": rows, "facesim_arc": fa, "facesim_cur": fc, "identities": idents}


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207)]


def plot_identity(title_lines, n_frames, series, no_face, seconds=None, fps=None, face_motion_rows=None,
                  width=960, height=540):
    """RGB uint8 chart. series: [(label, [(frame, value), ...])] drawn as lines over frames 0..n-1;
    seconds: [(second, value)] drawn as a black step line (each second spans its fps frames);
    no_face: frames marked red; face_motion_rows: [(frame, px)] as green bars in a lower panel."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=max(12, height // 36))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    n = max(1, int(n_frames))
    fs = getattr(font, "size", 12)
    left, right = int(width * 0.08), int(width * 0.97)
    top1 = int(fs * 1.3 * len(title_lines) + fs * 0.8)
    fm = [r for r in (face_motion_rows or []) if r[1] is not None]
    bot1 = int(height * 0.62) if fm else int(height - fs * 2.2)
    for i, line in enumerate(title_lines):
        d.text((left, 4 + fs * 1.3 * i), line, fill=(0, 0, 0), font=font)

    def xpos(t):
        return left + (right - left) * (t + 0.5) / n

    vals = [v for _, pts in series for _, v in pts if v is not None] + [v for _, v in (seconds or [])]
    lo = math.floor(min([0.0] + vals) * 4) / 4
    hi = max(1.0, math.ceil(max([1.0] + vals) * 4) / 4)

    def ypos(v):
        return bot1 - (bot1 - top1) * (v - lo) / (hi - lo)

    d.rectangle([left, top1, right, bot1], outline=(0, 0, 0))
    tick = lo
    while tick <= hi + 1e-9:
        d.line([left, ypos(tick), right, ypos(tick)], fill=(225, 225, 225))
        d.text((2, ypos(tick) - fs / 2), f"{tick:.2f}", fill=(0, 0, 0), font=font)
        tick += 0.25
    for t in no_face:
        d.line([xpos(t), top1, xpos(t), bot1], fill=(214, 39, 40), width=1)
    legend_y = top1 + 4
    for k, (label, pts) in enumerate(series):
        color = _COLORS[k % len(_COLORS)]
        pts = [(xpos(t), ypos(v)) for t, v in pts if v is not None]
        for a, b in zip(pts, pts[1:]):
            d.line([a, b], fill=color, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        d.text((right - fs * 18, legend_y), f"- {label}", fill=color, font=font)
        legend_y += fs * 1.2
    if seconds and fps:
        for s, v in seconds:
            x0, x1 = xpos(s * fps - 0.5), xpos(min(n, (s + 1) * fps) - 0.5)
            d.line([x0, ypos(v), x1, ypos(v)], fill=(0, 0, 0), width=3)
        d.text((right - fs * 18, legend_y), "= per second", fill=(0, 0, 0), font=font)
        legend_y += fs * 1.2
    if no_face:
        d.text((right - fs * 18, legend_y), "| no face", fill=(214, 39, 40), font=font)
    if fm:
        top2, bot2 = int(height * 0.70), int(height - fs * 2.2)
        fmax = max(v for _, v in fm) or 1.0
        d.rectangle([left, top2, right, bot2], outline=(0, 0, 0))
        d.text((2, top2), f"{fmax:.1f}", fill=(0, 0, 0), font=font)
        d.text((2, bot2 - fs), "0", fill=(0, 0, 0), font=font)
        bw = max(1.0, (right - left) / n * 0.7)
        for t, v in fm:
            y = bot2 - (bot2 - top2) * v / fmax
            d.rectangle([xpos(t) - bw / 2, y, xpos(t) + bw / 2, bot2], fill=(44, 160, 44))
        d.text((left, bot2 + 4), f"face motion (px/frame); frames 0..{n - 1}", fill=(0, 0, 0), font=font)
    else:
        d.text((left, bot1 + 4), f"frames 0..{n - 1}", fill=(0, 0, 0), font=font)
    return np.asarray(img, dtype=np.uint8)


def clean_json(obj):
    """JSON text with NaN/inf as null (JSON has no NaN)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=1)
