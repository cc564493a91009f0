"""StableAnimator's HJB face optimisation (pure torch).

At each active denoising step the x0 prediction is refined so that the decoded faces match the
reference ArcFace embedding: Adam on a detached fp32 copy of x0, `iterations` steps with
lr = eta * (1 - i / steps), loss = mean over frames of |1 - cos(e_frame, e_ref)| on 112x112 face
crops (bilinear, no landmark alignment, as upstream). The sampler then takes its normal update
from the refined x0.

Memory/speed choices over the upstream algorithm (which decodes every frame of the full latent
each iteration): decode only a latent window around the faces (with a margin), and for layouts
with frames on the batch axis only a subset of frames per iteration.
"""

import math

import torch
import torch.nn.functional as F


def hjb_learning_rate(step_index, total_steps, eta):
    return eta * (1.0 - step_index / total_steps)


def identity_loss(embeddings, reference):
    """mean_f |1 - cos(e_f, e_ref)|; embeddings (F, D), reference (D,) or (1, D)."""
    ref = reference.reshape(1, -1).to(embeddings)
    return (1.0 - F.cosine_similarity(embeddings, ref.expand_as(embeddings), dim=-1)).abs().mean()


MIN_FACE_BOX = 2  # pixels: the smallest face box a crop can be resampled from


def crop_faces(frames, boxes, size=112):
    """frames (F, 3, H, W), boxes (F, 4) integer x1, y1, x2, y2 in those frames' pixels ->
    (F, 3, size, size), bilinear. Differentiable in the frames."""
    crops = []
    for frame, (x1, y1, x2, y2) in zip(frames, boxes.tolist()):
        x1, y1 = max(int(x1), 0), max(int(y1), 0)
        x2, y2 = min(int(x2), frame.shape[-1]), min(int(y2), frame.shape[-2])
        if x2 - x1 < MIN_FACE_BOX or y2 - y1 < MIN_FACE_BOX:
            raise ValueError(f"face box {x1, y1, x2, y2} is empty inside a {frame.shape[-1]}x{frame.shape[-2]} frame")
        crops.append(F.interpolate(frame[None, :, y1:y2, x1:x2], size=(size, size), mode="bilinear", align_corners=False))
    return torch.cat(crops)


def detector_box(box, width, height):
    """A detector's float box (x1, y1, x2, y2, ...) in a width x height image -> the integer pixel box HJB crops:
    x1/y1 truncated and clipped at 0, x2/y2 clipped to the image and one pixel added (exclusive ends). The HJB hook's
    per-frame boxes and ArcFace Embed's 'recognizer' reference both come through here, so the two crops agree."""
    x1, y1, x2, y2 = (float(v) for v in list(box)[:4])
    return [int(max(x1, 0)), int(max(y1, 0)), int(min(x2, width)) + 1, int(min(y2, height)) + 1]


def face_embeddings(recognizer, frames, boxes, size=112):
    """What HJB's loss sees of each face: the box cropped from (F, 3, H, W) frames in 0..1, resized bilinearly to
    size x size, through the recogniser (which applies its own input scaling): (F, D) raw embeddings.
    Differentiable in the frames."""
    return recognizer(crop_faces(frames, boxes, size))


def boxes_from_masks(masks):
    """(F, H, W) masks -> (F, 4) x1, y1, x2, y2 (exclusive) boxes and a (F,) bool 'has a face'."""
    boxes, present = [], []
    for m in masks:
        ys, xs = torch.nonzero(m > 0.5, as_tuple=True)
        if len(ys) == 0:
            boxes.append([0, 0, m.shape[1], m.shape[0]])
            present.append(False)
        else:
            boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
            present.append(True)
    return torch.tensor(boxes, dtype=torch.long), torch.tensor(present)


def latent_window(boxes, scale, margin, latent_h, latent_w):
    """The latent rows/cols (y0, y1, x0, x1) that cover every box plus `margin` latent pixels.
    boxes are in output pixels; `scale` output pixels per latent pixel."""
    x1 = int(boxes[:, 0].min()) // scale - margin
    y1 = int(boxes[:, 1].min()) // scale - margin
    x2 = math.ceil(int(boxes[:, 2].max()) / scale) + margin
    y2 = math.ceil(int(boxes[:, 3].max()) / scale) + margin
    return max(y1, 0), min(y2, latent_h), max(x1, 0), min(x2, latent_w)


def refine_x0(x0, loss_fn, iterations, lr, between_iterations=None):
    """Adam on a detached fp32 copy of x0. loss_fn(z, iteration) returns the loss as a tensor (it is
    back-propagated here) or as a float after back-propagating it itself in pieces (z.grad filled).
    Returns (refined x0 in x0's dtype, [loss per iteration]). Gradients reach only the copy."""
    z = x0.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    losses = []
    for it in range(iterations):
        if between_iterations is not None:
            between_iterations(it)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(z, it)
        if torch.is_tensor(loss):
            loss.backward()
            loss = float(loss.detach())
        opt.step()
        losses.append(loss)
    return z.detach().to(x0.dtype), losses
