"""Named FLAME shape sliders, derived from whichever FLAME basis is loaded.

Each slider is a linear measurement m(v) of the neutral head (e.g. cheek-to-cheek width),
over vertex regions picked on the loaded template by position only (relative to the nose tip,
in units of the head width; see _measurement_weights). The placement is a heuristic checked on
synthetic heads only. Because FLAME is linear in its shape coefficients,
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
    """template (V,3) -> dict name -> (V,3) weights w so that m(v) = sum(w * v).

    Regions are placed relative to the nose tip (the front-most vertex; FLAME looks along +z with
    y up) in units of the head width W (ear to ear, ~0.155 m in FLAME): cheek band from 0.05 W below
    to 0.15 W above the nose tip, jaw band 0.25-0.35 W below it, chin 0.35-0.5 W below, forehead
    0.35-0.5 W above; only vertices less than 0.5 W behind the nose tip count (no ears, no back of
    the head, little neck)."""
    v = template.float()
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    nv = v.shape[0]
    nose = int(torch.argmax(z))
    xn, yn, zn = float(x[nose]), float(y[nose]), float(z[nose])
    width = max(_quantile(x, 0.98) - _quantile(x, 0.02), 1e-8)
    front = z >= zn - 0.5 * width

    def band(lo, hi, extra=None):
        m = front & (y >= yn + lo * width) & (y <= yn + hi * width)
        if extra is not None:
            m = m & extra
        idx = torch.nonzero(m).flatten()
        return idx if idx.numel() >= 4 else torch.nonzero(front).flatten()

    def width_weights(idx, frac=0.15):
        xs = x[idx]
        left = idx[xs <= torch.quantile(xs, frac)]
        right = idx[xs >= torch.quantile(xs, 1 - frac)]
        w = torch.zeros(nv, 3)
        w[right, 0] += 1.0 / len(right)
        w[left, 0] -= 1.0 / len(left)
        return w

    def mean_weights(idx, axis, sign=1.0):
        w = torch.zeros(nv, 3)
        w[idx, axis] += sign / len(idx)
        return w

    cheek = width_weights(band(-0.05, 0.15))
    jaw = width_weights(band(-0.35, -0.25))
    central = (x - xn).abs() <= 0.12 * width
    chin = band(-0.5, -0.35, central)
    forehead = band(0.35, 0.5, central)
    return {
        "face_width": cheek,
        "jaw_sharpness": cheek - jaw,  # sharper = jaw narrower than the cheeks
        "face_length": mean_weights(forehead, 1) + mean_weights(chin, 1, -1.0),
        "chin_forward": mean_weights(chin, 2),
    }


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


def parse_coefficients(text, n_max, where=""):
    """'0: 1.5, 3: -2' -> {0: 1.5, 3: -2.0}; empty text -> {}. NaN/inf values are refused."""
    from .finite import check_finite

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
        check_finite(v, f"shape_coefficients' entry '{part}", where)
        if not 0 <= i < n_max:
            raise ValueError(f"shape_coefficients index {i} is outside 0..{n_max - 1} (the coefficients this model has).")
        out[i] = out.get(i, 0.0) + v
    return out
