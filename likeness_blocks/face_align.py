"""Face alignment and cropping in torch, differentiable in the image and in the landmarks.

The ArcFace recognisers (glintr100, w600k_r50, ...) were trained on 112x112 crops where the
five landmarks (left eye, right eye, nose tip, left and right mouth corner, in image
coordinates, "left" = smaller x) sit on a fixed template. The crop is the least-squares
similarity transform (rotation, uniform scale, translation) that maps the detected landmarks
onto that template, applied with bilinear sampling. Coordinates follow OpenCV's convention:
pixel centres at integer positions, so a matrix here is the same matrix cv2.warpAffine takes.
"""

import torch

# The standard ArcFace 5-point template for a 112x112 crop (x, y).
ARCFACE_TEMPLATE_112 = torch.tensor(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=torch.float32,
)


def arcface_template(size=112, dtype=torch.float32, device=None):
    """Template landmarks for a square crop of `size` pixels.

    Multiples of 112 scale the 112 template; multiples of 128 scale the 128 variant (the 112
    template shifted right by 8 px and centred in a 128 crop), as the reference tools do. Other
    sizes scale the 112 template, so the face fills the crop the same way as at 112.
    """
    size = int(size)
    if size <= 0:
        raise ValueError(f"Crop size must be positive, got {size}.")
    if size % 112 == 0 or size % 128 != 0:
        ratio, shift = size / 112.0, 0.0
    else:
        ratio = size / 128.0
        shift = 8.0 * ratio
    t = ARCFACE_TEMPLATE_112.to(dtype=dtype, device=device) * ratio
    return t + torch.tensor([shift, 0.0], dtype=dtype, device=device)


def estimate_similarity(src, dst):
    """Least-squares similarity transform mapping points `src` onto `dst`.

    src: (B, K, 2) or (K, 2); dst: same or (K, 2) broadcast over the batch.
    Returns (B, 2, 3) (or (2, 3)) matrices M with dst ~= M @ [x, y, 1].

    With M = [[a, -b, tx], [b, a, ty]] the problem is linear; on centred coordinates
    a = sum(xs*xd + ys*yd) / sum(xs^2 + ys^2), b = sum(xs*yd - ys*xd) / sum(xs^2 + ys^2).
    This is the same optimum as Umeyama's method restricted to proper rotations (2-D).
    Differentiable in both point sets.
    """
    squeeze = src.dim() == 2
    if squeeze:
        src = src.unsqueeze(0)
    if dst.dim() == 2:
        dst = dst.unsqueeze(0).expand(src.shape[0], -1, -1)
    dst = dst.to(src)
    src_mean = src.mean(dim=1, keepdim=True)
    dst_mean = dst.mean(dim=1, keepdim=True)
    s = src - src_mean
    d = dst - dst_mean
    var = (s * s).sum(dim=(1, 2)).clamp_min(1e-12)
    a = ((s[..., 0] * d[..., 0]) + (s[..., 1] * d[..., 1])).sum(dim=1) / var
    b = ((s[..., 0] * d[..., 1]) - (s[..., 1] * d[..., 0])).sum(dim=1) / var
    rot = torch.stack([torch.stack([a, -b], dim=-1), torch.stack([b, a], dim=-1)], dim=1)  # (B, 2, 2)
    t = dst_mean.squeeze(1) - (rot @ src_mean.transpose(1, 2)).squeeze(-1)
    m = torch.cat([rot, t.unsqueeze(-1)], dim=-1)
    return m[0] if squeeze else m


def transform_points(points, matrix):
    """Apply (B, 2, 3) affine matrices to (B, K, 2) points."""
    return points @ matrix[..., :2].transpose(-1, -2) + matrix[..., 2].unsqueeze(-2)


def invert_affine(matrix):
    """Inverse of (B, 2, 3) affine matrices."""
    lin = matrix[..., :2]
    inv = torch.linalg.inv(lin)
    t = -(inv @ matrix[..., 2:])
    return torch.cat([inv, t], dim=-1)


def warp_affine(images, matrix, size, padding_mode="zeros"):
    """Warp (B, C, H, W) images with (B, 2, 3) src->dst matrices to (B, C, size, size).

    Same coordinate convention as cv2.warpAffine (pixel centres on integers), bilinear,
    zeros outside the image. Differentiable in images and matrices (kornia's warp).
    """
    import kornia.geometry.transform as KT

    if isinstance(size, int):
        size = (size, size)
    if matrix.dim() == 2:
        matrix = matrix.unsqueeze(0)
    if matrix.shape[0] != images.shape[0]:
        matrix = matrix.expand(images.shape[0], -1, -1)
    return KT.warp_affine(
        images, matrix.to(images), dsize=tuple(size), mode="bilinear", padding_mode=padding_mode, align_corners=True
    )


def alignment_matrix(kps, size=112):
    """(B, 5, 2) landmarks in image pixels -> (B, 2, 3) matrices to the `size` ArcFace crop."""
    return estimate_similarity(kps, arcface_template(size, dtype=kps.dtype, device=kps.device))


def align_faces(images, kps, size=112):
    """ArcFace-aligned crops: images (B, C, H, W) float, kps (B, 5, 2) -> (B, C, size, size)."""
    if kps.dim() == 2:
        kps = kps.unsqueeze(0)
    if images.shape[0] != kps.shape[0]:
        raise ValueError(
            f"align_faces got {images.shape[0]} images but {kps.shape[0]} landmark sets; pass one landmark set per image."
        )
    m = alignment_matrix(kps.to(images.dtype), size)
    return warp_affine(images, m, size)


def box_to_matrix(boxes, size=112):
    """(B, 4) boxes x1, y1, x2, y2 -> (B, 2, 3) matrices stretching each box onto a size x size crop.

    The box edges map onto the crop edges (x1 -> -0.5, x2 -> size - 0.5 in pixel-centre terms),
    i.e. a plain crop followed by a bilinear resize, as StableAnimator's reward model does.
    """
    x1, y1, x2, y2 = boxes.unbind(-1)
    sx = size / (x2 - x1).clamp_min(1e-6)
    sy = size / (y2 - y1).clamp_min(1e-6)
    zero = torch.zeros_like(sx)
    # a box edge x is the left edge of pixel x; crop pixel j's centre samples x1 + (j + 0.5) / sx - 0.5
    row0 = torch.stack([sx, zero, (sx - 1.0) * 0.5 - x1 * sx], dim=-1)
    row1 = torch.stack([zero, sy, (sy - 1.0) * 0.5 - y1 * sy], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def crop_boxes(images, boxes, size=112):
    """Differentiable crop + bilinear resize of (B, 4) boxes from (B, C, H, W) images."""
    if boxes.dim() == 1:
        boxes = boxes.unsqueeze(0)
    if boxes.shape[0] != images.shape[0]:
        raise ValueError(f"crop_boxes got {images.shape[0]} images but {boxes.shape[0]} boxes; pass one box per image.")
    return warp_affine(images, box_to_matrix(boxes.to(images.dtype), size), size, padding_mode="border")


def box_masks(boxes_per_image, height, width, dtype=torch.float32):
    """Filled-rectangle masks: list (per image) of (N, 4) boxes -> (B, H, W) in {0, 1}."""
    out = torch.zeros(len(boxes_per_image), height, width, dtype=dtype)
    for i, boxes in enumerate(boxes_per_image):
        for box in boxes:
            x1, y1, x2, y2 = [float(v) for v in box]
            xa, ya = max(0, int(round(x1))), max(0, int(round(y1)))
            xb, yb = min(width, int(round(x2))), min(height, int(round(y2)))
            if xb > xa and yb > ya:
                out[i, ya:yb, xa:xb] = 1.0
    return out
