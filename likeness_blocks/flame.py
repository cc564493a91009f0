"""FLAME head model in pure torch: linear blend skinning (LBS) over 5 joints.

Written from the published model definition (template + shape/expression blend shapes,
pose-corrective blend shapes, joint regression, forward kinematics, skinning). The model
arrays themselves are licensed and supplied by the user (see loaders/flame.py).

Conventions (those of FLAME / DECA):
- joints: 0 global (root), 1 neck, 2 jaw, 3 left eye, 4 right eye;
- DECA's 6 pose numbers are [global axis-angle (3), jaw axis-angle (3)]; neck and eyes stay zero;
- shapedirs hold 300 identity components followed by the expression components
  (DECA uses the first 100 identity and the first 50 expression ones).
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

# FLAME files put the identity (shape) basis first; expressions start after it.
FLAME_N_SHAPE_BASIS = 300
REQUIRED_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "f")


def axis_angle_to_matrix(aa):
    """(..., 3) axis-angle -> (..., 3, 3) rotation matrices (Rodrigues' formula).

    A zero vector gives the identity exactly."""
    angle = torch.linalg.vector_norm(aa, dim=-1, keepdim=True)
    safe = torch.where(angle > 1e-12, angle, torch.ones_like(angle))
    axis = torch.where(angle > 1e-12, aa / safe, torch.zeros_like(aa))
    kx, ky, kz = axis.unbind(-1)
    zero = torch.zeros_like(kx)
    k = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], dim=-1).reshape(*aa.shape[:-1], 3, 3)
    s = torch.sin(angle)[..., None]
    c = torch.cos(angle)[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(k)
    return eye + s * k + (1.0 - c) * (k @ k)


class FlameLayer(nn.Module):
    """FLAME forward: parameters -> vertices (B, V, 3).

    Arrays (numpy or torch) as stored in a FLAME file:
      v_template (V,3), shapedirs (V,3,K), posedirs (V,3,9*(J-1)), J_regressor (J,V) dense,
      kintree_table (2,J), weights (V,J), f (F,3).
    """

    def __init__(self, arrays, n_shape_basis=FLAME_N_SHAPE_BASIS):
        super().__init__()
        missing = [k for k in REQUIRED_KEYS if k not in arrays]
        if missing:
            raise ValueError(
                f"The FLAME model is missing {missing}; it needs {list(REQUIRED_KEYS)}. "
                "Use FLAME's generic_model.pkl (FLAME 2020 or 2023) or a file converted from it."
            )

        def t(name, dtype=torch.float32):
            return torch.as_tensor(np.asarray(arrays[name]), dtype=dtype)

        v_template = t("v_template")
        shapedirs = t("shapedirs")
        posedirs = t("posedirs")
        j_reg = t("J_regressor")
        weights = t("weights")
        faces = t("f", torch.long)
        kintree = t("kintree_table", torch.long)
        nv = v_template.shape[0]
        nj = j_reg.shape[0]
        if v_template.shape != (nv, 3) or shapedirs.shape[:2] != (nv, 3) or posedirs.shape[:2] != (nv, 3):
            raise ValueError(
                f"FLAME arrays disagree: v_template {tuple(v_template.shape)}, shapedirs {tuple(shapedirs.shape)}, "
                f"posedirs {tuple(posedirs.shape)}; the file looks damaged or is not a FLAME model."
            )
        if j_reg.shape != (nj, nv) or weights.shape != (nv, nj) or kintree.shape != (2, nj):
            raise ValueError(
                f"FLAME joint arrays disagree: J_regressor {tuple(j_reg.shape)}, weights {tuple(weights.shape)}, "
                f"kintree_table {tuple(kintree.shape)}; the file looks damaged or is not a FLAME model."
            )
        if posedirs.shape[2] != 9 * (nj - 1):
            raise ValueError(f"FLAME posedirs has {posedirs.shape[2]} components; {9 * (nj - 1)} expected for {nj} joints.")
        parents = kintree[0].clone()
        parents[0] = -1
        for j in range(1, nj):
            if not 0 <= int(parents[j]) < j:
                raise ValueError("FLAME kintree_table must list every joint after its parent.")

        k_total = shapedirs.shape[2]
        n_shape_basis = min(n_shape_basis, k_total)
        self.n_shape_basis = n_shape_basis
        self.n_expr_basis = k_total - n_shape_basis
        self.register_buffer("v_template", v_template)
        self.register_buffer("shapedirs", shapedirs[:, :, :n_shape_basis].contiguous())
        self.register_buffer("exprdirs", shapedirs[:, :, n_shape_basis:].contiguous())
        # (P, V*3): pose feature -> flattened vertex offsets
        self.register_buffer("posedirs", posedirs.reshape(nv * 3, -1).t().contiguous())
        self.register_buffer("J_regressor", j_reg)
        self.register_buffer("lbs_weights", weights)
        self.register_buffer("faces", faces)
        self.register_buffer("parents", parents)
        self._parents_list = [int(p) for p in parents]

    @property
    def num_vertices(self):
        return self.v_template.shape[0]

    @property
    def num_joints(self):
        return self.J_regressor.shape[0]

    def _blend(self, coeffs, basis, what):
        if coeffs is None or coeffs.shape[-1] == 0:
            return 0.0
        if coeffs.shape[-1] > basis.shape[-1]:
            raise ValueError(
                f"{coeffs.shape[-1]} {what} coefficients given but this FLAME file has only {basis.shape[-1]}."
            )
        return torch.einsum("bk,vck->bvc", coeffs, basis[:, :, : coeffs.shape[-1]])

    def shape_offsets(self, shape):
        """Identity-basis offsets (B, V, 3) for shape coefficients (B, K<=300)."""
        return self._blend(shape, self.shapedirs, "shape")

    def forward(self, shape=None, expression=None, pose=None, neck_pose=None, eye_pose=None):
        """shape (B,<=300), expression (B,<=100), pose (B,6) = [global aa, jaw aa],
        neck_pose (B,3), eye_pose (B,6). Any may be None (zeros). Returns vertices (B,V,3)."""
        given = [x for x in (shape, expression, pose, neck_pose, eye_pose) if x is not None]
        b = given[0].shape[0] if given else 1
        dev, dt = self.v_template.device, self.v_template.dtype

        def z(n):
            return torch.zeros(b, n, device=dev, dtype=dt)

        pose = z(6) if pose is None else pose.to(dev, dt)
        neck_pose = z(3) if neck_pose is None else neck_pose.to(dev, dt)
        eye_pose = z(6) if eye_pose is None else eye_pose.to(dev, dt)
        if pose.shape[-1] != 6:
            raise ValueError(f"pose must hold 6 numbers (global + jaw axis-angle), got {pose.shape[-1]}.")
        full_pose = torch.cat([pose[:, :3], neck_pose, pose[:, 3:], eye_pose], dim=1)  # (B, 15)
        shape = None if shape is None else shape.to(dev, dt)
        expression = None if expression is None else expression.to(dev, dt)
        return self.lbs(full_pose, shape, expression)

    def lbs(self, full_pose, shape=None, expression=None):
        b = full_pose.shape[0]
        nj = self.num_joints
        v = self.v_template.unsqueeze(0) + self.shape_offsets(shape) + self._blend(expression, self.exprdirs, "expression")
        v = v.expand(b, -1, -1)
        joints = torch.einsum("jv,bvc->bjc", self.J_regressor, v)  # (B, J, 3)

        rot = axis_angle_to_matrix(full_pose.reshape(b, nj, 3))  # (B, J, 3, 3)
        eye = torch.eye(3, dtype=v.dtype, device=v.device)
        pose_feature = (rot[:, 1:] - eye).reshape(b, -1)
        v_posed = v + (pose_feature @ self.posedirs).reshape(b, -1, 3)

        # forward kinematics: world transform of every joint
        rel = joints.clone()
        rel[:, 1:] = joints[:, 1:] - joints[:, self._parents_list[1:]]
        world_r = [rot[:, 0]]
        world_t = [rel[:, 0]]
        for j in range(1, nj):
            p = self._parents_list[j]
            world_r.append(world_r[p] @ rot[:, j])
            world_t.append(world_t[p] + (world_r[p] @ rel[:, j, :, None])[..., 0])
        world_r = torch.stack(world_r, dim=1)  # (B, J, 3, 3)
        world_t = torch.stack(world_t, dim=1)  # (B, J, 3)
        # skinning transform: x -> R_j (x - J_j) + T_j
        offset = world_t - (world_r @ joints[..., None])[..., 0]
        r_v = torch.einsum("vj,bjkl->bvkl", self.lbs_weights, world_r)
        t_v = torch.einsum("vj,bjk->bvk", self.lbs_weights, offset)
        return (r_v @ v_posed[..., None])[..., 0] + t_v


@dataclass
class FlameVertices:
    """What the FLAME_VERTICES socket carries."""

    vertices: torch.Tensor  # (B, V, 3) float32, FLAME world units (metres), CPU
    faces: torch.Tensor = None  # (F, 3) long, or None for a bare point set (e.g. a .ply without faces)
    shape: torch.Tensor = None  # (B, n_shape) identity coefficients, or None when unknown
    expression: torch.Tensor = None  # (B, n_exp)
    pose: torch.Tensor = None  # (B, 6) global + jaw axis-angle
    cam: torch.Tensor = None  # (B, 3) DECA orthographic camera (scale, tx, ty), unused for vertices
    meta: dict = field(default_factory=dict)  # crop mode, pose mode, source file...

    def __len__(self):
        return self.vertices.shape[0]

    def replace(self, **changes):
        data = {k: getattr(self, k) for k in ("vertices", "faces", "shape", "expression", "pose", "cam")}
        data["meta"] = dict(self.meta)
        data.update(changes)
        return FlameVertices(**data)
