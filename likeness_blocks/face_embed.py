"""From an IMAGE batch to FaceEmbeds: detect, choose faces, align, embed (batched).

`detector` is any object with
    detect(bgr_uint8 (H, W, 3), size, threshold) -> (boxes (N, 5) [x1 y1 x2 y2 score], kps (N, 5, 2))
    embed(crops (N, 3, S, S) float RGB [0, 1]) -> (N, D) raw embeddings
    rec_input_size, name, det_fixed_size
(loaders.insightface.InsightFacePack), so this module needs neither ComfyUI nor onnxruntime.
"""

import numpy as np
import torch

from .face_align import align_faces, box_masks
from .face_types import DetectedFace, FaceEmbeds

FACE_CHOICES = ("largest", "by index (left to right)", "all")
MIN_SIDE = 16


def to_rgb(images, input_name="image"):
    """ComfyUI IMAGE (B, H, W, C) with C in 1 (gray), 3 (RGB), 4 (RGBA) -> (B, H, W, 3) float32 in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"'{input_name}' must be an IMAGE tensor, got {type(images).__name__}.")
    if images.dim() == 3 and images.shape[-1] in (1, 3, 4):
        images = images.unsqueeze(0)
    if images.dim() == 3:  # (B, H, W) gray without a channel axis
        images = images.unsqueeze(-1)
    if images.dim() != 4 or images.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"'{input_name}' must be an IMAGE batch shaped (batch, height, width, channels) with 1, 3 or 4 channels; "
            f"got shape {tuple(images.shape)}."
        )
    if images.shape[0] == 0:
        raise ValueError(f"'{input_name}' is an empty batch (0 images); connect at least one image.")
    c = images.shape[-1]
    images = images.float()
    if c == 1:
        images = images.expand(-1, -1, -1, 3)
    elif c == 2:  # gray + alpha
        images = images[..., :1].expand(-1, -1, -1, 3)
    elif c == 4:  # RGBA: drop alpha (faces are judged on colour only)
        images = images[..., :3]
    h, w = images.shape[1:3]
    if min(h, w) < MIN_SIDE:
        raise ValueError(
            f"'{input_name}' is {w}x{h} pixels; face detection needs images at least {MIN_SIDE} px on each side. "
            "Upscale the image or use a larger one."
        )
    return torch.nan_to_num(images, nan=0.0).clamp(0.0, 1.0).contiguous()


def to_bgr_uint8(rgb):
    """(H, W, 3) float [0, 1] torch -> contiguous uint8 BGR numpy (what insightface's detector takes)."""
    a = (rgb.detach().cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(a[..., ::-1])


def detection_sizes(det_size, minimum=320):
    """Detector sizes to try in order: det_size, then smaller (multiples of 32) down to 320."""
    det_size = int(det_size)
    sizes = [det_size]
    for s in (480, 320):
        if s < det_size and s >= minimum:
            sizes.append(s)
    return sizes


def detect_with_retries(detector, bgr, det_size, threshold):
    """(boxes, kps, size used) at the first size that finds a face, or empty arrays and None."""
    fixed = getattr(detector, "det_fixed_size", None)
    sizes = [fixed[0]] if fixed else detection_sizes(det_size)
    tried = []
    for s in sizes:
        boxes, kps = detector.detect(bgr, s, threshold)
        tried.append(s)
        if len(boxes):
            return boxes, kps, s, tried
    return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32), None, tried


def order_left_to_right(boxes, kps):
    cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
    order = np.argsort(cx, kind="stable")
    return boxes[order], kps[order]


def choose(boxes, kps, face_choice, face_index):
    """Indices (into left-to-right ordered arrays) of the faces to keep, or an error text."""
    n = len(boxes)
    if face_choice == "all":
        return list(range(n)), None
    if face_choice == "largest":
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return [int(np.argmax(area))], None
    if face_choice.startswith("by index"):
        if face_index < n:
            return [int(face_index)], None
        return [], f"has {n} face{'s' if n != 1 else ''} but face_index is {face_index} (0 = leftmost)"
    raise ValueError(f"face_choice must be one of {', '.join(FACE_CHOICES)}; got {face_choice!r}.")


def embed_faces(detector, images, face_choice="largest", face_index=0, skip_missing=False, det_size=640,
                threshold=0.5, crop_size=512, input_name="image", recognizer=None):
    """Returns (FaceEmbeds, crops (N, S, S, 3), large crops (N, C, C, 3), masks (B, H, W), report text).

    recognizer (a differentiable ArcFaceTorch, e.g. CurricularFace): the faces are embedded by it instead of the
    pack's recogniser, cut as HJB Face Guidance cuts decoded frames (see box_embeddings)."""
    rgb = to_rgb(images, input_name)
    b, h, w, _ = rgb.shape
    rec_size = int(getattr(detector, "rec_input_size", 112))
    faces, crops, large, boxes_per_image, skipped, lines = [], [], [], [], [], []
    for i in range(b):
        boxes, kps, used, tried = detect_with_retries(detector, to_bgr_uint8(rgb[i]), det_size, threshold)
        picked, problem = [], None
        if used is None:
            problem = f"no face found (detector sizes tried: {', '.join(map(str, tried))}; threshold {threshold})"
        else:
            boxes, kps = order_left_to_right(boxes, kps)
            picked, problem = choose(boxes, kps, face_choice, face_index)
        if problem:
            if not skip_missing:
                raise ValueError(
                    f"'{input_name}' image {i} (of {b}, counting from 0): {problem}. Use a clearer, larger, frontal face, "
                    "lower the detection threshold, or set on_no_face to 'skip image' to drop such images."
                )
            skipped.append(i)
            boxes_per_image.append([])
            lines.append(f"image {i}: skipped, {problem}")
            continue
        sel_boxes, sel_kps = boxes[picked], kps[picked]
        boxes_per_image.append(sel_boxes[:, :4])
        kt = torch.from_numpy(np.ascontiguousarray(sel_kps, dtype=np.float32))
        img = rgb[i].permute(2, 0, 1).unsqueeze(0).expand(len(picked), -1, -1, -1)
        crops.append(align_faces(img, kt, rec_size))
        large.append(align_faces(img, kt, crop_size))
        for j, p in enumerate(picked):
            faces.append(DetectedFace(
                image_index=i,
                bbox=torch.from_numpy(np.asarray(sel_boxes[j, :4], dtype=np.float32).copy()),
                kps=kt[j].clone(),
                det_score=float(sel_boxes[j, 4]),
                embedding=torch.zeros(0),
            ))
        note = "" if used == tried[0] else f" (found after lowering the detector size to {used})"
        lines.append(f"image {i}: {len(boxes)} face(s) detected, kept {len(picked)}{note}")
    if not faces:
        raise ValueError(
            f"No face was found in any of the {b} '{input_name}' images ({'; '.join(lines)}). "
            "Use images with a clearly visible face or lower the detection threshold."
        )
    crops_t = torch.cat(crops).clamp(0, 1)
    large_t = torch.cat(large).clamp(0, 1)
    if recognizer is None:
        emb = torch.from_numpy(detector.embed(crops_t.numpy()))
        made_by = dict(model_name=getattr(detector, "rec_name", ""))
    else:
        emb = box_embeddings(recognizer, rgb, faces)
        kind = getattr(recognizer, "kind", "arcface")
        made_by = dict(model_name=getattr(recognizer, "name", ""), recognizer_kind=kind, crop="box")
        lines.append(f"embedded with {made_by['model_name'] or 'the connected recogniser'} ({kind}) on each detected box, "
                     "resized to 112x112 as HJB Face Guidance crops decoded frames")
    if not bool(torch.isfinite(emb).all()):
        raise ValueError(f"The recogniser gave non-finite embeddings for '{input_name}'; the model file is damaged "
                         "or in a precision it cannot run in. Load it again (fp32).")
    for f, e in zip(faces, emb):
        f.embedding = e.float().clone()
    if skipped:
        lines.append(f"skipped images: {skipped}")
    fe = FaceEmbeds(faces=faces, image_sizes=[(h, w)] * b, skipped=skipped, **made_by)
    masks = box_masks(boxes_per_image, h, w)
    return fe, crops_t.permute(0, 2, 3, 1).contiguous(), large_t.permute(0, 2, 3, 1).contiguous(), masks, "\n".join(lines)


@torch.no_grad()
def box_embeddings(recognizer, rgb, faces):
    """(N, D) raw embeddings of `faces` (DetectedFace, bbox in rgb's pixels) in rgb (B, H, W, 3) 0..1: each box
    turned into pixels and cropped, resized and embedded exactly as HJB Face Guidance does it on decoded frames
    (likeness_blocks.hjb.detector_box and face_embeddings), so the reference and the optimised frames agree."""
    from .hjb import detector_box, face_embeddings

    h, w = rgb.shape[1:3]
    p = next(iter(recognizer.parameters()), None)
    if p is None:
        p = next(iter(recognizer.buffers()), torch.zeros(0))
    frames = torch.stack([rgb[f.image_index] for f in faces]).permute(0, 3, 1, 2).to(p.device)
    boxes = torch.tensor([detector_box(f.bbox.tolist(), w, h) for f in faces], dtype=torch.long)
    return face_embeddings(recognizer, frames, boxes).float().cpu()


def largest_face_per_frame(detector, rgb, det_size=640, threshold=0.5):
    """rgb (T, H, W, 3) float -> list per frame of (bbox (4,), kps (5, 2), score) or None."""
    out = []
    for t in range(rgb.shape[0]):
        boxes, kps, used, _ = detect_with_retries(detector, to_bgr_uint8(rgb[t]), det_size, threshold)
        if used is None:
            out.append(None)
            continue
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        k = int(np.argmax(area))
        out.append((boxes[k, :4].astype(np.float32), kps[k].astype(np.float32), float(boxes[k, 4])))
    return out


def frame_embeddings(detector, rgb, dets, batch_size=64):
    """Align every detected face and embed them in batches of `batch_size` (1 = a per-frame loop).

    Returns (frame_ids list, embeddings (N, D) tensor)."""
    ids = [t for t, d in enumerate(dets) if d is not None]
    if not ids:
        return ids, torch.zeros(0, 512)
    size = int(getattr(detector, "rec_input_size", 112))
    embs = []
    for s in range(0, len(ids), max(1, int(batch_size))):
        chunk = ids[s:s + max(1, int(batch_size))]
        img = rgb[chunk].permute(0, 3, 1, 2)
        kps = torch.from_numpy(np.stack([dets[t][1] for t in chunk]))
        crops = align_faces(img, kps, size).clamp(0, 1)
        embs.append(torch.from_numpy(detector.embed(crops.numpy(), batch_size=len(chunk))))
    return ids, torch.cat(embs)


def all_faces_embedded(detector, rgb, det_size=640, threshold=0.5, batch_size=64):
    """Every detected face of every frame, embedded in batches: (frame ids (N,), embeddings (N, D))."""
    owners, imgs, kpss = [], [], []
    for t in range(rgb.shape[0]):
        boxes, kps, used, _ = detect_with_retries(detector, to_bgr_uint8(rgb[t]), det_size, threshold)
        for k in range(len(boxes) if used is not None else 0):
            owners.append(t)
            kpss.append(np.asarray(kps[k], np.float32))
    if not owners:
        return [], torch.zeros(0, 512)
    size = int(getattr(detector, "rec_input_size", 112))
    step = max(1, int(batch_size))
    embs = []
    for s in range(0, len(owners), step):
        chunk = owners[s:s + step]
        img = rgb[chunk].permute(0, 3, 1, 2)
        crops = align_faces(img, torch.from_numpy(np.stack(kpss[s:s + step])), size).clamp(0, 1)
        embs.append(torch.from_numpy(detector.embed(crops.numpy(), batch_size=len(chunk))))
    return owners, torch.cat(embs)
