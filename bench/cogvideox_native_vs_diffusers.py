"""ComfyUI's own CogVideoX (ComfyUI >= 0.33, stock 'Load Diffusion Model') vs the pack's diffusers-based
CogVideoX ('Load CogVideoX') on the SAME weights.

Both models are built from one random-weight state dict of the real architecture (tiny widths): ComfyUI's
from its native key layout through its own detection (comfy.model_detection.model_config_from_unet) and
model class (model_base.CogVideoX), ours from the diffusers names (the 1:1 rename of loaders/cogvideox.py).
Layouts: RoPE only (CogVideoX-5B T2V), RoPE + learned positional table (CogVideoX-5B-I2V, FantasyID), sin-cos table
without RoPE (CogVideoX-2B). Non-square latent, several frames, text length 226 (the learned table's text slots).

Printed per layout (max |native - ours|, and that over max |ours|):
  network, as ComfyUI builds it      the transformer alone, same input, timestep 500, same text
    ... := ours                      the same with the native positional encoding swapped for ours: the cause
  apply_model at the middle sigma    one BaseModel.apply_model call (sigma of t = 500), same sampler-space latent
    native network in our conventions / native apply_model vs that: the network and the v-prediction
    conventions (comfy.model_sampling) separately; x0 from the exact v: the conventions with a perfect network
plus the sigma tables (5B: SNR shift 1; 2B: SNR shift 3).

    LIKENESS_COMFYUI=/work/main/.comfyui/ComfyUI-0.33.0 /work/main/.venv-0.33/bin/python \\
        bench/cogvideox_native_vs_diffusers.py [--grid tiny|5b] [--seed 0] [--layouts t2v,i2v,2b]

--grid 5b uses CogVideoX-5B's own token grid (13 latent frames of 60x90, the 480x720x49 default the learned table
is trained for; the native model then comes from the unchanged comfy.sd.load_diffusion_model_state_dict) and needs
a GPU or patience; tiny (default) shrinks the model's sample size to 4 latent frames of 12x20 on both sides.
"""

import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = {  # --layouts key: (title, diffusers config entries)
    "t2v": ("RoPE (CogVideoX-5B T2V)", dict(in_channels=16, use_rotary_positional_embeddings=True,
                                    use_learned_positional_embeddings=False)),
    "i2v": ("learned pos. table + RoPE (CogVideoX-5B-I2V, FantasyID)", dict(
        in_channels=32, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)),
    "2b": ("sin-cos table, no RoPE (CogVideoX-2B)", dict(in_channels=16, use_rotary_positional_embeddings=False,
                                                         use_learned_positional_embeddings=False)),
}
GRIDS = {  # (latent frames, latent height, latent width)
    "tiny": (4, 12, 20),
    "5b": (13, 60, 90),
}
T_MID = 500


def setup(cpu):
    sys.path[:0] = [os.path.join(REPO, "tests"), REPO]
    from support.comfy_env import import_comfy, import_pack

    import_comfy(cpu=cpu)
    import_pack()


def diffusers_config(layout, grid):
    frames, h, w = grid
    # ComfyUI's detection assumes head_dim 64; its sin-cos table needs a width divisible by 3, diffusers' by 4
    return dict(num_attention_heads=3, attention_head_dim=64,
                out_channels=16, time_embed_dim=64, text_embed_dim=64, num_layers=2, max_text_seq_length=226,
                sample_height=h, sample_width=w, sample_frames=(frames - 1) * 4 + 1, patch_size=2, **LAYOUTS[layout][1])


def random_weights(cfg, seed):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    tr = CogVideoXTransformer3DModel(**cfg).eval()
    with torch.no_grad():  # every parameter matters (zero-initialised ones included)
        for p in tr.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if tr.patch_embed.use_learned_positional_embeddings:
            tr.patch_embed.pos_embedding.add_(torch.randn_like(tr.patch_embed.pos_embedding) * 0.05)
    return {k: v.detach().clone().contiguous() for k, v in tr.state_dict().items()}


def to_native(sd, L):
    """diffusers names -> ComfyUI's native names (the inverse of the loader's 1:1 rename, checked to be 1:1)."""
    inverse = {}
    for k in sd:
        native = None
        for cand in _native_candidates(k, L):
            if L.native_key_to_diffusers(cand) == k:
                native = cand
        if native is None:
            raise SystemExit(f"no native name for diffusers key {k}")
        inverse[native] = sd[k]
    assert len(inverse) == len(sd)
    return inverse


def _native_candidates(key, L):
    module, _, leaf = key.rpartition(".")
    if key in L.NATIVE_BUFFERS.values():
        return [n for n, d in L.NATIVE_BUFFERS.items() if d == key]
    if module.startswith("transformer_blocks."):
        _, idx, inner = module.split(".", 2)
        return [f"blocks.{idx}.{n}.{leaf}" for n, d in L.NATIVE_BLOCK_MODULES.items() if d == inner]
    return [f"{n}.{leaf}" for n, d in L.NATIVE_TOP_MODULES.items() if d == module]


def native_model(native_sd, cfg, grid_name):
    import comfy.model_detection
    import comfy.sd

    if grid_name == "5b":  # exactly what 'Load Diffusion Model' does with the file
        mp = comfy.sd.load_diffusion_model_state_dict(dict(native_sd), model_options={"dtype": torch.float32})
        return mp.model
    # the same detection and model class, with the sample size set to the tiny grid (the learned table's size)
    mc = comfy.model_detection.model_config_from_unet(native_sd, "")
    mc.unet_config.update(sample_height=cfg["sample_height"], sample_width=cfg["sample_width"],
                          sample_frames=cfg["sample_frames"])
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model(native_sd, "")
    missing, unexpected = model.diffusion_model.load_state_dict(native_sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


class _patched:
    """Sets an attribute for a `with` block (instance attribute or module global) and restores it."""

    def __init__(self, obj, name, value):
        self.obj, self.name, self.value = obj, name, value

    def __enter__(self):
        self.had = self.name in vars(self.obj)
        self.old = vars(self.obj).get(self.name)
        setattr(self.obj, self.name, self.value)

    def __exit__(self, *exc):
        if self.had:
            setattr(self.obj, self.name, self.old)
        else:
            delattr(self.obj, self.name)


def diff(a, b):
    d = (a.float() - b.float()).abs().max().item()
    return d, d / b.float().abs().max().item()


def measure(layout, grid_name, seed, device, L, emit):
    import comfy.ldm.cogvideo.model as native_mod

    grid = GRIDS[grid_name]
    cfg = diffusers_config(layout, grid)
    sd = random_weights(cfg, seed)
    ours = L.build_model_patcher(cfg, dict(sd), torch.float32).model.to(device)
    nat = native_model(to_native(sd, L), cfg, grid_name).to(device)
    ndm, odm = nat.diffusion_model, ours.diffusion_model
    frames, h, w = grid
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, 16, frames, h, w, generator=g).to(device)  # sampler-space latent (x0 + sigma * noise)
    ctx = torch.randn(1, 226, cfg["text_embed_dim"], generator=g).to(device)
    concat = torch.randn(1, 16, frames, h, w, generator=g).to(device) if cfg["in_channels"] == 32 else None
    net_in = torch.cat([x, concat], dim=1) if concat is not None else x
    t = torch.tensor([float(T_MID)], device=device)
    emit(f"native config from ComfyUI's detection: use_rotary_positional_embeddings="
            f"{ndm.use_rotary_positional_embeddings}, use_learned_positional_embeddings="
            f"{ndm.patch_embed.use_learned_positional_embeddings} (ours: {cfg['use_rotary_positional_embeddings']}, "
            f"{cfg['use_learned_positional_embeddings']})")
    p = cfg["patch_size"]
    with torch.no_grad():
        ref = odm(net_in, t, context=ctx)
        emit("network, as ComfyUI builds it", *diff(ndm(net_in, t, ctx), ref))
        if cfg["use_rotary_positional_embeddings"]:
            # the cause: give the native network our RoPE table (diffusers' get_3d_rotary_pos_embed on the crop
            # grid of the model's sample size) and switch RoPE on where detection switched it off
            table = odm.rotary_embedding(frames, h // p, w // p, device)
            native_table = native_mod.CogVideoXTransformer3DModel._get_rotary_emb(ndm, h // p, w // p, frames, device)
            emit("  RoPE cos table, native formula vs ours", *diff(native_table[0], table[0]))
            with _patched(ndm, "use_rotary_positional_embeddings", True), \
                    _patched(ndm, "_get_rotary_emb", lambda *_a, **_k: table):
                emit("  network, native RoPE := ours (switched on)", *diff(ndm(net_in, t, ctx), ref))
                if cfg["use_learned_positional_embeddings"]:
                    pe_o, pe_n = odm.patch_embed.pos_embedding, ndm.patch_embed.pos_embedding
                    text = cfg["max_text_seq_length"]
                    emit("  learned table: max |text slots| (native adds 0)", pe_o[:, :text].abs().max().item(), None)
                    saved = pe_o[:, :text].clone()
                    pe_o[:, :text] = 0
                    try:
                        ref0 = odm(net_in, t, context=ctx)
                        emit("  + text slots of the table zeroed in ours", *diff(ndm(net_in, t, ctx), ref0))
                    finally:
                        pe_o[:, :text] = saved
                    assert torch.equal(pe_n[:, text:], pe_o[:, text:])
        else:
            # detection switched RoPE on for a file without a learned table; with it off, the native sin-cos
            # table is used, which splits the width 1/3 time : 2/3 space (diffusers: 1/4 : 3/4)
            pe = ndm.patch_embed
            with _patched(ndm, "use_rotary_positional_embeddings", False), \
                    _patched(pe, "use_positional_embeddings", True):
                emit("  network, RoPE off + native sin-cos table", *diff(ndm(net_in, t, ctx), ref))
                from diffusers.models.embeddings import get_3d_sincos_pos_embed as diffusers_sincos

                def ours_sincos(dim, spatial, temporal, s_scale, t_scale, device=None):
                    return diffusers_sincos(dim, spatial, temporal, s_scale, t_scale, device=device, output_type="pt")

                with _patched(native_mod, "get_3d_sincos_pos_embed", ours_sincos):
                    emit("  network, RoPE off + diffusers' sin-cos table", *diff(ndm(net_in, t, ctx), ref))
        sigma = ours.model_sampling.sigmas[T_MID].reshape(1).to(device)
        kw = {"c_crossattn": ctx}
        if concat is not None:
            kw["c_concat"] = concat
        den_ours = ours.apply_model(x, sigma, **kw)
        den_nat = nat.apply_model(x, sigma, **kw)
        emit(f"apply_model at sigma {float(sigma):.4f} (t={T_MID})", *diff(den_nat, den_ours))
        # split: the native network inside our (diffusers') v-prediction conventions, and the conventions alone
        ms_n, ms_o = nat.model_sampling, ours.model_sampling
        emit("  timestep fed to the network, native", float(ms_n.timestep(sigma)), None)
        emit("  timestep fed to the network, ours", float(ms_o.timestep(sigma)), None)
        emit("  network input / x, native (calculate_input)", float((ms_n.calculate_input(sigma, x) / x).mean()), None)
        emit("  network input / x, ours = sqrt(alpha_bar)", float((ms_o.calculate_input(sigma, x) / x).mean()), None)
        xin = ms_o.calculate_input(sigma, x)
        xin = torch.cat([xin, concat], dim=1) if concat is not None else xin
        v_nat = ndm(xin, ms_o.timestep(sigma).float(), ctx)
        den_mixed = ms_o.calculate_denoised(sigma, v_nat, x)
        emit("  native network in our conventions vs ours", *diff(den_mixed, den_ours))
        emit("  native apply_model vs native network in ours", *diff(den_nat, den_mixed))
        # the conventions with an exact network: x = x0 + sigma * eps (ComfyUI's noise_scaling on both sides),
        # v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (what CogVideoX was trained to predict)
        x0 = torch.randn(x.shape, generator=g).to(device)
        eps = torch.randn(x.shape, generator=g).to(device)
        xs = ms_o.noise_scaling(sigma, eps, x0)
        assert torch.allclose(ms_n.noise_scaling(sigma, eps, x0), xs)
        ab = 1.0 / (sigma ** 2 + 1.0)
        v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
        emit("  x0 from the exact v, native calculate_denoised", *diff(ms_n.calculate_denoised(sigma, v, xs), x0))
        emit("  x0 from the exact v, ours", *diff(ms_o.calculate_denoised(sigma, v, xs), x0))


def sigma_tables():
    import comfy.supported_models

    A = sys.modules["likeness_pack.adapters.cogvideox"]
    nat_cfg = comfy.supported_models.CogVideoX_T2V({"image_model": "cogvideox", "num_attention_heads": 48})
    import comfy.model_base

    nat_ms = comfy.model_base.model_sampling(nat_cfg, comfy.model_base.ModelType.V_PREDICTION_DDPM)
    out = []
    for name, shift in (("5B (SNR shift 1.0)", 1.0), ("2B (SNR shift 3.0)", 3.0)):
        ours = A.make_model_sampling(shift).sigmas
        n = nat_ms.sigmas
        mid = slice(0, 999)  # the terminal sigma is the same clamp on both sides
        out.append((name, float(((n[mid] - ours[mid]).abs() / ours[mid]).max())))
    return out


def emit(*row):
    if len(row) == 1:
        print("  " + row[0])
    elif row[2] is None:
        print(f"  {row[0]:<52} {row[1]:.6g}")
    else:
        print(f"  {row[0]:<52} max abs {row[1]:.3e}   relative {row[2]:.3e}")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="tiny", choices=sorted(GRIDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layouts", default="t2v,i2v,2b", help="comma-separated: " + ", ".join(LAYOUTS))
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    setup(cpu=not cuda)
    try:
        import comfy.ldm.cogvideo.model  # noqa: F401
    except ImportError:
        raise SystemExit("This ComfyUI has no native CogVideoX (it arrived after 0.3.75): run with "
                         "LIKENESS_COMFYUI pointing at ComfyUI >= 0.33 and its venv.")
    import importlib

    from support.paths import comfyui_dir

    L = importlib.import_module("likeness_pack.loaders.cogvideox")
    device = torch.device("cuda" if cuda else "cpu")
    try:
        import comfyui_version

        version = comfyui_version.__version__
    except ImportError:
        version = "?"
    f, h, w = GRIDS[a.grid]
    print(f"ComfyUI {version} ({comfyui_dir()}), torch {torch.__version__}, "
          f"{device}, fp32; latent {f} frames x {h}x{w} (token grid {h // 2}x{w // 2}), seed {a.seed}")
    for layout in a.layouts.split(","):
        print(f"\n== {LAYOUTS[layout][0]}")
        measure(layout, a.grid, a.seed, device, L, emit)
    print("\n== sigma tables, max relative difference native vs ours (t = 0..998)")
    for name, d in sigma_tables():
        print(f"  {name:<48} {d:.3e}")


if __name__ == "__main__":
    main()
