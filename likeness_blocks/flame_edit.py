"""Named FLAME shape sliders, derived from whichever FLAME basis is loaded.

Each slider is a linear measurement m(v) of the neutral head (e.g. cheek-to-cheek width),
picked on the loaded template by position only (front half of the head, height bands
relative to the face). Because FLAME is linear in its shape coefficients,
dm/dbeta_k = m(shapedirs[:, :, k]) exactly; the slider direction is that gradient over the
first K coefficients, normalised to unit length (later sliders are made orthogonal to the
earlier ones so that they do not fight). Slider value s adds s * direction to the shape
coefficients: s = 1 is one standard deviation of the shape space along the direction that
changes the measurement fastest. Nothing here is FLAME data: the directions are computed at
load time from the user's file.
"""

import torch

SLIDER_ORDER = ("face_width", "jaw_sharpness", "face_length", "chin_forward")


def _quantile(x, q):
    return torch.quantile(x.float(), q).item()


def _measurement_weights(template):
    """template (V,3) -> dict name -> (V,3) weights w so that m(v) = sum(w * v)."""
    v = template.float()
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    nv = v.shape[0]
    front = z >= _quantile(z, 0.5)
    yf = y[front]
    y_lo, y_hi = _quantile(yf, 0.05), _quantile(yf, 0.95)
    span = max(y_hi - y_lo, 1e-8)
    x_mid = (_quantile(x, 0.02) + _quantile(x, 0.98)) / 2.0

    def band(a, b):
        return front & (y >= y_lo + a * span) & (y <= y_lo + b * span)

    def sides(mask, frac=0.15):
        idx = torch.nonzero(mask).flatten()
        if idx.numel() < 4:
            idx = torch.nonzero(front).flatten()
        xs = x[idx]
        lo, hi = torch.quantile(xs, frac).item(), torch.quantile(xs, 1 - frac).item()
        left = idx[xs <= lo]
        right = idx[xs >= hi]
        return left, right

    def width_weights(mask):
        w = torch.zeros(nv, 3)
        left, right = sides(mask)
        w[right, 0] += 1.0 / len(right)
        w[left, 0] -= 1.0 / len(left)
        return w

    cheek = width_weights(band(0.40, 0.60))
    jaw = width_weights(band(0.10, 0.25))
    out = {"face_width": cheek, "jaw_sharpness": cheek - jaw}  # sharper = jaw narrower than cheeks

    length = torch.zeros(nv, 3)
    fidx = torch.nonzero(front).flatten()
    central = fidx[(x[fidx] - x_mid).abs() <= 0.15 * span]
    if central.numel() < 4:
        central = fidx
    yc = y[central]
    top = central[yc >= torch.quantile(yc, 0.9)]
    bottom = central[yc <= torch.quantile(yc, 0.1)]
    length[top, 1] += 1.0 / len(top)
    length[bottom, 1] -= 1.0 / len(bottom)
    out["face_length"] = length

    chin = torch.zeros(nv, 3)
    low = central[yc <= torch.quantile(yc, 0.15)]
    chin[low, 2] += 1.0 / len(low)
    out["chin_forward"] = chin
    return out


def derive_sliders(flame, n_coeffs=100):
    """-> dict name -> {'direction': (K,) unit vector over shape coefficients, 'gain': metres per unit}."""
    k = min(n_coeffs, flame.shapedirs.shape[2])
    basis = flame.shapedirs[:, :, :k].float().cpu()  # (V,3,K)
    weights = _measurement_weights(flame.v_template.cpu())
    sliders, taken = {}, []
    for name in SLIDER_ORDER:
        g = torch.einsum("vc,vck->k", weights[name], basis)
        for d in taken:  # keep the sliders independent of each other
            g = g - (g @ d) * d
        norm = torch.linalg.vector_norm(g)
        if norm < 1e-12:
            continue
        d = g / norm
        taken.append(d)
        sliders[name] = {"direction": d, "gain": float((weights[name] * torch.einsum("vck,k->vc", basis, d)).sum())}
    return sliders


def measure(template_like, vertices):
    """Slider measurements of vertices (B,V,3), using regions picked on template_like (V,3)."""
    w = _measurement_weights(template_like)
    return {name: (vertices.float() * wt).sum(dim=(-2, -1)) for name, wt in w.items()}


def parse_coefficients(text, n_max):
    """'0: 1.5, 3: -2' -> {0: 1.5, 3: -2.0}; empty text -> {}."""
    out = {}
    text = (text or "").strip()
    if not text:
        return out
    for part in text.replace(";", ",").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if ":" not in part and "=" not in part:
            raise ValueError(
                f"shape_coefficients entry '{part}' is not 'index: value'; write e.g. '0: 1.5, 3: -2'."
            )
        i, v = part.replace("=", ":").split(":", 1)
        try:
            i, v = int(i), float(v)
        except ValueError:
            raise ValueError(f"shape_coefficients entry '{part}' is not 'index: value' with an integer index.") from None
        if not 0 <= i < n_max:
            raise ValueError(f"shape_coefficients index {i} is outside 0..{n_max - 1} (the coefficients this model has).")
        out[i] = out.get(i, 0.0) + v
    return out
