"""A small z-buffered, shaded mesh / point renderer in pure torch (orthographic camera).

Used to preview FLAME heads as an IMAGE. Triangles are rasterised by enumerating the pixels
of each triangle's bounding box, testing barycentric coordinates and keeping the nearest
fragment per pixel (scatter max on depth). Shading is Lambertian with interpolated vertex
normals (two-sided) plus ambient light. Without faces, vertices are drawn as depth-shaded discs.
"""

import math

import torch
import torch.nn.functional as F


def view_rotation(yaw_deg=0.0, pitch_deg=0.0, dtype=torch.float32):
    """Rotation turning the head by yaw (about y, positive turns it to its left) then pitch (about x)."""
    a, b = math.radians(yaw_deg), math.radians(pitch_deg)
    ry = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=dtype)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]], dtype=dtype)
    return rx @ ry


def project(vertices, width, height, yaw=0.0, pitch=0.0, margin=0.08, frame=None):
    """(V,3) -> pixel coordinates (V,2) (pixel centres at integers, y down) and depth (V,) (larger = nearer).

    frame: optional (V',3) points used to place the camera (so several meshes share one framing)."""
    r = view_rotation(yaw, pitch, vertices.dtype)
    ref = (vertices if frame is None else frame) @ r.T
    lo, hi = ref.amin(0), ref.amax(0)
    centre = (lo + hi) / 2
    extent = torch.clamp(torch.maximum(hi[0] - lo[0], hi[1] - lo[1]), min=1e-8)
    s = (1 - 2 * margin) * min(width, height) / extent
    v = (vertices @ r.T - centre) * s
    px = (width - 1) / 2.0 + v[:, 0]
    py = (height - 1) / 2.0 - v[:, 1]
    return torch.stack([px, py], -1), v[:, 2], r


def vertex_normals(vertices, faces):
    tri = vertices[faces]  # (F,3,3)
    fn = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)  # area weighted
    vn = torch.zeros_like(vertices)
    for k in range(3):
        vn.index_add_(0, faces[:, k], fn)
    return F.normalize(vn, dim=-1, eps=1e-12)


def rasterize(xy, depth, faces, width, height, max_pairs=4_000_000):
    """-> face index per pixel (H*W,) (-1 = empty) and barycentrics (H*W, 3)."""
    dev = xy.device
    npix = width * height
    zbuf = torch.full((npix,), -float("inf"), device=dev)
    face_id = torch.full((npix,), -1, dtype=torch.long, device=dev)
    bary_buf = torch.zeros(npix, 3, device=dev)
    tri = xy[faces]  # (F,3,2)
    tz = depth[faces]  # (F,3)
    x0 = torch.ceil(tri[..., 0].amin(1)).clamp(0, width - 1).long()
    x1 = torch.floor(tri[..., 0].amax(1)).clamp(0, width - 1).long()
    y0 = torch.ceil(tri[..., 1].amin(1)).clamp(0, height - 1).long()
    y1 = torch.floor(tri[..., 1].amax(1)).clamp(0, height - 1).long()
    bw = (x1 - x0 + 1).clamp(min=0)
    bh = (y1 - y0 + 1).clamp(min=0)
    (ax, ay), (bx, by), (cx, cy) = tri[:, 0].unbind(-1), tri[:, 1].unbind(-1), tri[:, 2].unbind(-1)
    area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    visible = (bw > 0) & (bh > 0) & (area.abs() > 1e-12)
    # drop boxes that are empty, or hugely off because of a degenerate projection
    counts = torch.where(visible, bw * bh, torch.zeros_like(bw))
    order = torch.nonzero(counts).flatten()
    csum = torch.cumsum(counts[order], 0)
    start = 0
    while start < order.numel():
        base = csum[start - 1] if start > 0 else torch.zeros((), dtype=csum.dtype, device=dev)
        stop = int(torch.searchsorted(csum, base + max_pairs, right=True))
        stop = max(stop, start + 1)
        f = order[start:stop]
        cnt = counts[f]
        fi = torch.repeat_interleave(f, cnt)
        first = torch.cumsum(cnt, 0) - cnt
        local = torch.arange(fi.numel(), device=dev) - torch.repeat_interleave(first, cnt)
        px = x0[fi] + local % bw[fi]
        py = y0[fi] + torch.div(local, bw[fi], rounding_mode="floor")
        pxf, pyf = px.float(), py.float()
        w_a = ((bx[fi] - pxf) * (cy[fi] - pyf) - (by[fi] - pyf) * (cx[fi] - pxf)) / area[fi]
        w_b = ((cx[fi] - pxf) * (ay[fi] - pyf) - (cy[fi] - pyf) * (ax[fi] - pxf)) / area[fi]
        w_c = 1.0 - w_a - w_b
        inside = (w_a >= -1e-6) & (w_b >= -1e-6) & (w_c >= -1e-6)
        fi, px, py = fi[inside], px[inside], py[inside]
        bary = torch.stack([w_a[inside], w_b[inside], w_c[inside]], -1)
        z = (bary * tz[fi]).sum(-1)
        pix = py * width + px
        zbuf.scatter_reduce_(0, pix, z, reduce="amax")
        win = z >= zbuf[pix]
        face_id[pix[win]] = fi[win]
        bary_buf[pix[win]] = bary[win]
        start = stop  # later chunks only overwrite pixels where they are nearer (zbuf persists)
    return face_id, bary_buf, zbuf


def render_mesh(vertices, faces=None, width=512, height=512, yaw=0.0, pitch=0.0, color=(0.78, 0.74, 0.70),
                background=(0.12, 0.12, 0.14), point_radius=None, frame=None):
    """vertices (V,3) -> image (H,W,3) float32 in [0,1]."""
    vertices = vertices.detach().float()
    dev = vertices.device
    xy, depth, r = project(vertices, width, height, yaw, pitch, frame=frame)
    col = torch.tensor(color, dtype=torch.float32, device=dev)
    bg = torch.tensor(background, dtype=torch.float32, device=dev)
    img = bg.expand(height * width, 3).clone()
    light = F.normalize(torch.tensor([-0.35, 0.45, 1.0], device=dev), dim=0)
    if faces is not None and faces.numel() > 0:
        faces = faces.to(dev).long()
        face_id, bary, _ = rasterize(xy, depth, faces, width, height)
        hit = face_id >= 0
        normals = vertex_normals(vertices @ r.T, faces)
        n = (bary[hit, :, None] * normals[faces[face_id[hit]]]).sum(1)
        n = F.normalize(n, dim=-1, eps=1e-12)
        lambert = (n @ light).abs()
        spec = lambert.pow(24) * 0.15
        img[hit] = (col * (0.22 + 0.78 * lambert)[:, None] + spec[:, None]).clamp(0, 1)
    else:
        rad = point_radius or max(1, round(min(width, height) / 256))
        off = torch.arange(-rad, rad + 1, device=dev)
        oy, ox = torch.meshgrid(off, off, indexing="ij")
        keep = (ox**2 + oy**2) <= rad * rad + 0.5
        ox, oy = ox[keep], oy[keep]
        cxp, cyp = torch.round(xy[:, 0]).long(), torch.round(xy[:, 1]).long()
        px = (cxp[:, None] + ox[None]).flatten()
        py = (cyp[:, None] + oy[None]).flatten()
        z = depth[:, None].expand(-1, ox.numel()).flatten()
        ok = (px >= 0) & (px < width) & (py >= 0) & (py < height)
        pix = (py * width + px)[ok]
        z = z[ok]
        zbuf = torch.full((width * height,), -float("inf"), device=dev)
        zbuf.scatter_reduce_(0, pix, z, reduce="amax")
        hit = torch.isfinite(zbuf)
        zmin, zmax = depth.min(), depth.max()
        t = ((zbuf[hit] - zmin) / torch.clamp(zmax - zmin, min=1e-8)).clamp(0, 1)
        img[hit] = col * (0.3 + 0.7 * t)[:, None]
    return img.reshape(height, width, 3).cpu()
