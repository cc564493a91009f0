"""Mutation score of the identity paths (issue 17): `make mutate` (not in CI, it takes a while).

Applies each mutation listed in MUTANTS (an operator flipped, an index off by one, arguments swapped, a term dropped) to
a temporary copy of the repository, runs the tests that should notice it (stopping at the first failure, with a time
limit per mutant), and reports the share of mutants killed and the survivors. The worktree itself is never modified.

Each mutation names its file, an exact snippet that must occur exactly once in it, and the replacement; a snippet that
no longer matches fails the run (so this list keeps up with the code). Add a mutation whenever you add an identity path.

    .venv/bin/python scripts/mutate.py                 # all
    .venv/bin/python scripts/mutate.py --only hjb      # ids containing "hjb"
    .venv/bin/python scripts/mutate.py --list
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

T_CONCAT = ["tests/test_wiring_concat_id.py", "tests/test_concat_id.py"]
T_CONCAT_COG = ["tests/test_concat_id_cogvideox.py::test_patched_prediction_equals_plain_reference",
                "tests/test_concat_id_cogvideox.py::test_percent_window_and_bad_inputs"]
T_SA_BLOCKS = ["tests/test_stableanimator_blocks.py"]
T_SA_SVD = ["tests/test_stableanimator_svd.py::test_block_with_id_adapter_matches_reference",
            "tests/test_stableanimator_svd.py::test_pose_patch_adds_after_conv_in_on_cond_only",
            "tests/test_stableanimator_svd.py::test_tile_indices_and_weights",
            "tests/test_stableanimator_svd.py::test_tiled_apply_model_blends_tiles",
            "tests/test_stableanimator_svd.py::test_strength_zero_is_bit_exact_and_strength_one_differs"]
T_FID_BLOCKS = ["tests/test_fantasyid_blocks.py"]
T_FID_COG = ["tests/test_fantasyid_cogvideox.py::test_patched_blocks_match_plain_torch_reference",
             "tests/test_fantasyid_cogvideox.py::test_block_range_interval_and_percent",
             "tests/test_fantasyid_cogvideox.py::test_cfg_sampling_both_branches_get_ids"]
T_FID_INJ = ["tests/test_fantasyid_loader.py::test_injector_after_every_block_video_only",
             "tests/test_fantasyid_loader.py::test_injector_strength_zero_and_block_range_and_token_slice",
             "tests/test_fantasyid_loader.py::test_injector_hooks_on_tensor_blocks_and_removal"]
T_SPIRALS = ["tests/test_wiring_spirals.py", "tests/test_fantasyid_blocks.py"]
# test_hjb's real-size VAE tests take many minutes on a CPU without bf16 units: left out here
T_HJB = ["tests/test_wiring_hjb.py", "tests/test_hjb.py", "-k", "not reduced_precision and not upstream_chunks"]
T_HJB_CUR = ["tests/test_hjb_curricularface.py"]
T_METRICS = ["tests/test_wiring_metrics.py", "tests/test_face_blocks.py::test_metrics_numbers"]
T_FACE_ALIGN = ["tests/test_face_blocks.py"]

# (id, file, snippet, replacement, tests)
MUTANTS = [
    # --- Concat-ID on Wan: reference placement, positions, block, cut ------------------------------------------------
    ("concat.slot_h_for_w", "likeness_blocks/concat_id.py", "return t + k, 0, w", "return t + k, 0, h", T_CONCAT),
    ("concat.slot_same_time", "likeness_blocks/concat_id.py", "return t + k, 0, w", "return t, 0, w", T_CONCAT),
    ("concat.side_by_side_off_by_one", "likeness_blocks/concat_id.py", "return t, 0, (k + 1) * w",
     "return t, 0, (k + 2) * w", T_CONCAT),
    ("concat.rows_cols_swapped", "likeness_blocks/concat_id.py", "rr + r0, cc + c0", "cc + r0, rr + c0", T_CONCAT),
    ("concat.adapter_grid_swapped", "adapters/wan.py", "concat_id_positions(gt, gh, gw, n_refs, placement)",
     "concat_id_positions(gt, gw, gh, n_refs, placement)", T_CONCAT),
    ("concat.cut_last_frames", "adapters/wan.py", "return out[:, :, :t, :h, :w]", "return out[:, :, -t:, :h, :w]",
     T_CONCAT),
    ("concat.gate_dropped", "likeness_blocks/concat_id.py", "        x = x + y * e[2]\n", "        x = x + y\n",
     T_CONCAT),
    ("concat.ref_gate_from_video", "likeness_blocks/concat_id.py", "xr = xr + y[:, lv:] * e_ref[2]",
     "xr = xr + y[:, lv:] * e[2]", T_CONCAT),
    ("concat.ffn_quirk_dropped", "likeness_blocks/concat_id.py", "_modulate(norm2(xr), e_ref[0], e_ref[1])",
     "_modulate(norm2(xr), e_ref[3], e_ref[4])", T_CONCAT),
    ("concat.refs_get_cross_attn", "likeness_blocks/concat_id.py",
     "        xv = x[:, :lv]\n        xv = xv + cross_attn(norm3(xv))\n        x = torch.cat([xv, x[:, lv:]], 1)\n",
     "        x = x + cross_attn(norm3(x))\n", T_CONCAT),
    ("concat.strength_bias_off_by_one", "adapters/wan.py", "bias[:, s - n_ref:] = log_strength",
     "bias[:, s - n_ref - 1:] = log_strength", T_CONCAT),
    ("concat.key_bias_scale", "likeness_blocks/concat_id.py", "qx[..., 0] = math.sqrt(dp)", "qx[..., 0] = math.sqrt(d)",
     T_CONCAT),
    ("concat.adaln_silu_dropped", "adapters/wan.py", "F.linear(F.silu(e), wgt, bias)", "F.linear(e, wgt, bias)",
     T_CONCAT),
    ("concat.resize_match_width", "likeness_blocks/concat_id.py", "if h / w >= height / width:",
     "if h / w < height / width:", T_CONCAT),
    ("concat_cog.cut_last_frames", "adapters/cogvideox_concat_id.py", "return out[:, :, :t]", "return out[:, :, -t:]",
     T_CONCAT_COG),
    ("concat_cog.refs_first", "adapters/cogvideox_concat_id.py", "return torch.cat([x, refs], dim=2)",
     "return torch.cat([refs, x], dim=2)", T_CONCAT_COG),
    # --- StableAnimator: ID attention alignment, face encoder, PoseNet wiring ----------------------------------------
    ("sa.renorm_mean_of_id", "likeness_blocks/stableanimator.py", "* sd_ref / (sd_id + eps) + mu_ref",
     "* sd_ref / (sd_id + eps) + mu_id", T_SA_BLOCKS),
    ("sa.renorm_per_token", "likeness_blocks/stableanimator.py", "dims = tuple(range(1, h_id.ndim))",
     "dims = tuple(range(2, h_id.ndim))", T_SA_BLOCKS),
    ("sa.renorm_eps_inside", "likeness_blocks/stableanimator.py", "sd_id = h_id.std(dim=dims, keepdim=True)",
     "sd_id = (h_id.var(dim=dims, keepdim=True) + eps).sqrt() - eps", T_SA_BLOCKS),
    ("sa.id_scale_dropped", "likeness_blocks/stableanimator.py", "return h_txt + scale * renormalize_to(",
     "return h_txt + renormalize_to(", T_SA_BLOCKS),
    ("sa.perceiver_scale", "likeness_blocks/stableanimator.py", "s = self.dim_head ** -0.25", "s = self.dim_head ** -0.5",
     T_SA_BLOCKS),
    ("sa.encoder_norm_dropped", "likeness_blocks/stableanimator.py", "        x = self.norm(x)\n", "", T_SA_BLOCKS),
    # (the face keys alone given to the unconditional chunk is an equivalent mutant: with its values zero, the face
    # attention adds nothing whatever the keys; so the mutant gives it the face keys and values)
    ("sa.uncond_gets_face", "adapters/svd.py", "zk, zv = torch.zeros_like(ik), torch.zeros_like(iv)",
     "zk, zv = ik, iv", T_SA_SVD),
    ("sa.pose_on_uncond", "adapters/svd.py", "add = torch.cat([torch.zeros_like(lat) if f == 1 else lat for f in flags])",
     "add = torch.cat([lat for f in flags])", T_SA_SVD),
    ("sa.pose_wrong_block", "adapters/svd.py", 'transformer_options.get("block") != ("input", 0)',
     'transformer_options.get("block") != ("input", 1)', T_SA_SVD),
    ("sa.pose_range", "adapters/svd.py", "x = self.pose_images[..., :3].movedim(-1, 1).float() * 2.0 - 1.0",
     "x = self.pose_images[..., :3].movedim(-1, 1).float()", T_SA_SVD),
    ("sa.pose_strength_dropped", "adapters/svd.py", "lat = lat * self.strength", "lat = lat * 1.0", T_SA_SVD),
    ("sa.tile_weights", "likeness_blocks/stableanimator.py", "return torch.minimum(w, 2.0 - w)",
     "return torch.minimum(w, 1.0 - w)", T_SA_SVD),
    ("face_align.template_scale", "likeness_blocks/face_align.py", "size / 112.0", "size / 128.0", T_FACE_ALIGN),
    # --- FantasyID: ID tokens, spirals, layer-aware injection ---------------------------------------------------------
    ("fid.inject_strength_dropped", "adapters/layer_injection.py", "return hidden_states + self.strength * delta",
     "return hidden_states + delta", T_FID_INJ + T_FID_BLOCKS + T_FID_COG),
    ("fid.module_index", "adapters/layer_injection.py", "idx = block_index // self.interval", "idx = block_index",
     T_FID_INJ + T_FID_BLOCKS + T_FID_COG),
    ("fid.block_end_inclusive", "adapters/layer_injection.py", "block_index >= self.block_end",
     "block_index > self.block_end", T_FID_INJ + T_FID_BLOCKS + T_FID_COG),
    ("fid.video_slice_all", "adapters/layer_injection.py", "video = hidden_states[:, self.video_tokens]",
     "video = hidden_states", T_FID_INJ + T_FID_BLOCKS + T_FID_COG),
    ("fid.la_scale", "likeness_blocks/fantasyid/layer_attention.py", "scale=self.dim_head ** -0.5",
     "scale=self.dim_head ** -0.25", T_FID_INJ + T_FID_BLOCKS + T_FID_COG),
    ("fid.la_norm_dropped", "likeness_blocks/fantasyid/layer_attention.py",
     "x = self.norm1(id_tokens.to(hidden_states.dtype))", "x = id_tokens.to(hidden_states.dtype)",
     T_FID_INJ + T_FID_BLOCKS + T_FID_COG),
    ("fid.abstractor_cls_kept", "likeness_blocks/fantasyid/face_abstractor.py", "ctx = mapping(h)[:, 1:]",
     "ctx = mapping(h)[:, :-1]", T_FID_BLOCKS),
    ("fid.abstractor_pos_once", "likeness_blocks/fantasyid/face_abstractor.py", "        for i in idx:\n",
     "        for i in idx[-1:]:\n", T_FID_BLOCKS),
    ("fid.depth_offset", "likeness_blocks/fantasyid/vertex.py", "depth_sin_encoding(0.5 * coarse[:, :, 2:] + 0.5",
     "depth_sin_encoding(0.5 * coarse[:, :, 2:]", T_FID_BLOCKS),
    ("fid.depth_sin_cos_swapped", "likeness_blocks/fantasyid/vertex.py",
     "torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], dim=-1)",
     "torch.stack([pos[..., 0::2].cos(), pos[..., 1::2].sin()], dim=-1)", T_FID_BLOCKS),
    ("fid.fuse_keeps_face_part", "likeness_blocks/fantasyid/vertex.py", "return tokens[:, : self.num_v_coarse]",
     "return tokens[:, -self.num_v_coarse:]", T_FID_BLOCKS),
    ("spiral.no_rotation", "likeness_blocks/fantasyid/spirals.py", "for u in nbrs[start:] + nbrs[:start]:",
     "for u in nbrs:", T_SPIRALS),
    ("spiral.reverse_direction", "likeness_blocks/fantasyid/spirals.py",
     "        return [self.to_v[h] for h in self.outgoing(v)]", "        return [self.to_v[h] for h in self.outgoing(v)][::-1]",
     T_SPIRALS),
    ("spiral.no_boundary_adjust", "likeness_blocks/fantasyid/spirals.py",
     "            if needs_adjust[i]:\n                self._adjust_outgoing(vs[i])",
     "            if needs_adjust[i]:\n                pass", T_SPIRALS),
    ("spiral.fallback_off_by_one", "likeness_blocks/fantasyid/spirals.py", "while len(spiral) + len(next_ring) < total:",
     "while len(spiral) + len(next_ring) <= total:", T_SPIRALS),
    # --- HJB refine loop ---------------------------------------------------------------------------------------------
    ("hjb.lr_schedule_dropped", "likeness_blocks/hjb.py", "return eta * (1.0 - step_index / total_steps)",
     "return eta", T_HJB),
    ("hjb.strength_not_applied", "adapters/sampler_hook.py", "return denoised + self.strength * (refined - denoised)",
     "return refined", T_HJB),
    ("hjb.box_x_not_shifted", "adapters/sampler_hook.py", "boxes[:, [0, 2]] -= x0 * up", "boxes[:, [0, 2]] -= 0",
     T_HJB),
    ("hjb.box_y_in_latent_px", "adapters/sampler_hook.py", "boxes[:, [1, 3]] -= y0 * up", "boxes[:, [1, 3]] -= y0",
     T_HJB),
    ("hjb.window_margin_sign", "likeness_blocks/hjb.py", "x1 = int(boxes[:, 0].min()) // scale - margin",
     "x1 = int(boxes[:, 0].min()) // scale + margin", T_HJB),
    ("hjb.loss_sum", "likeness_blocks/hjb.py", ".abs().mean()", ".abs().sum()", T_HJB),
    ("hjb.crop_nearest", "likeness_blocks/hjb.py", 'size=(size, size), mode="bilinear"', 'size=(size, size), mode="nearest"',
     T_HJB),
    ("hjb.grads_accumulate", "likeness_blocks/hjb.py", "opt.zero_grad(set_to_none=True)", "pass", T_HJB),
    ("hjb.bf16_amx_ignored", "adapters/sampler_hook.py", '{"avx512_bf16", "amx_bf16"} & set(value.split())',
     '{"avx512_bf16"} & set(value.split())', T_HJB),
    ("hjb.bf16_ampere_excluded", "adapters/sampler_hook.py", "get_device_capability(device)[0] >= 8",
     "get_device_capability(device)[0] > 8", T_HJB),
    ("hjb.bf16_disabled", "adapters/sampler_hook.py", "return cpuinfo_has_bf16(f.read())", "return False", T_HJB),
    ("hjb.inactive_at_start", "adapters/sampler_hook.py", "self.start_percent * total <= i <=",
     "self.start_percent * total < i <=", T_HJB),
    # --- HJB with CurricularFace (issue 18): the reference cut, scaled and embedded as HJB sees decoded faces ---------
    ("hjb_cur.reference_aligned_crop", "likeness_blocks/face_embed.py", "emb = box_embeddings(recognizer, rgb, faces)",
     "emb = recognizer(crops_t).float()", T_HJB_CUR),
    ("hjb_cur.reference_by_pack", "likeness_blocks/face_embed.py", "emb = box_embeddings(recognizer, rgb, faces)",
     "emb = torch.from_numpy(detector.embed(crops_t.numpy()))", T_HJB_CUR),
    ("hjb_cur.reference_box_as_detected", "likeness_blocks/face_embed.py", "detector_box(f.bbox.tolist(), w, h)",
     "[int(v) for v in f.bbox.tolist()]", T_HJB_CUR),
    ("hjb_cur.reference_box_w_h_swapped", "likeness_blocks/face_embed.py", "detector_box(f.bbox.tolist(), w, h)",
     "detector_box(f.bbox.tolist(), h, w)", T_HJB_CUR),
    ("hjb_cur.hook_box_as_detected", "adapters/sampler_hook.py",
     "found.append(hjb.detector_box(boxes[int(areas.argmax()), :4], w, h))",
     "found.append([int(v) for v in boxes[int(areas.argmax()), :4]])", T_HJB_CUR),
    ("hjb_cur.unit_scaling", "likeness_blocks/arcface.py",
     'ArcFaceTorch(net, 127.5, 127.5, net.input_size, name=name, kind="curricularface")',
     'ArcFaceTorch(net, 0.0, 255.0, net.input_size, name=name, kind="curricularface")', T_HJB_CUR),
    ("hjb_cur.recogniser_check_dropped", "nodes/hjb.py", "        check_reference_recognizer(arcface, reference)\n", "",
     T_HJB_CUR),
    ("hjb_cur.same_file_not_checked", "nodes/hjb.py",
     'if ref_by_rec and reference.model_name != getattr(arcface, "name", ""):', "if False:", T_HJB_CUR),
    ("hjb_cur.kind_not_recorded", "likeness_blocks/face_embed.py", 'recognizer_kind=kind, crop="box"', 'crop="box"',
     T_HJB_CUR),
    # --- identity metrics ------------------------------------------------------------------------------------------
    ("metrics.first_frame_as_reference", "nodes/face.py",
     "ref = M.reference_vector(refs)",
     "ref = M.reference_vector(emb[:1] if emb.shape[0] else refs)", T_METRICS),
    ("metrics.previous_box", "likeness_blocks/metrics.py",
     "v = flow_magnitude_in_box(frames_gray[t - 1], frames_gray[t], boxes[t])",
     "v = flow_magnitude_in_box(frames_gray[t - 1], frames_gray[t], boxes[t - 1] if boxes[t - 1] is not None else boxes[t])",
     T_METRICS),
    ("metrics.flow_backwards", "likeness_blocks/metrics.py", "cv2.calcOpticalFlowFarneback(prev_gray, gray,",
     "cv2.calcOpticalFlowFarneback(gray, prev_gray,", T_METRICS),
    ("metrics.ifs_across_gaps", "likeness_blocks/metrics.py", "if frame_ids[k] == frame_ids[k - 1] + 1:",
     "if frame_ids[k] > frame_ids[k - 1]:", T_METRICS),
    ("metrics.refs_not_normalised", "likeness_blocks/metrics.py",
     "r = F.normalize(ref_embeddings.float(), dim=-1).mean(dim=0)", "r = ref_embeddings.float().mean(dim=0)",
     T_METRICS),
    ("metrics.min_is_max", "likeness_blocks/metrics.py", '"similarity_to_reference_min": float(min(',
     '"similarity_to_reference_min": float(max(', T_METRICS),
]


def copy_repo(dst):
    """The tracked and untracked-not-ignored files, plus the environment links (.venv, .comfyui) as links."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if not src.is_file():
            continue
        out = dst / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
    for link in (".venv", ".comfyui"):
        if (REPO / link).exists():
            os.symlink((REPO / link).resolve(), dst / link)


def run_mutant(root, mutant, python, timeout):
    mid, rel, old, new, tests = mutant
    path = root / rel
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"mutant {mid}: the snippet occurs {text.count(old)} times in {rel} (must be once): {old!r}")
    path.write_text(text.replace(old, new))
    start = time.time()
    try:
        r = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                           capture_output=True, text=True, timeout=timeout)
        # 1: a test failed; 2: collection failed (e.g. the mutant does not import); others: a broken test selection
        status = "survived" if r.returncode == 0 else ("killed" if r.returncode in (1, 2) else f"error rc={r.returncode}")
        out = r.stdout + r.stderr
        failed = next((line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))), "")
    except subprocess.TimeoutExpired:
        status, failed = "timeout", ""
    finally:
        path.write_text(text)
    return status, time.time() - start, failed


def main():
    ap = argparse.ArgumentParser(description="Mutation score of the identity paths.")
    ap.add_argument("--only", default="", help="run the mutants whose id contains this text (comma-separated)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--check", action="store_true", help="only check that every snippet matches once")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant (a timeout counts as killed)")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    args = ap.parse_args()
    wanted = [w for w in args.only.split(",") if w]
    mutants = [m for m in MUTANTS if not wanted or any(w in m[0] for w in wanted)]
    if args.list:
        for m in mutants:
            print(f"{m[0]:34s} {m[1]}")
        return 0
    if args.check:
        bad = [m[0] for m in mutants if (REPO / m[1]).read_text().count(m[2]) != 1]
        print("snippets:", "all match once" if not bad else f"not matching once: {bad}")
        return 1 if bad else 0
    killed, survivors = 0, []
    with tempfile.TemporaryDirectory(prefix="likeness-mutate-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        for m in mutants:  # check every snippet before spending time on tests
            if (root / m[1]).read_text().count(m[2]) != 1:
                raise SystemExit(f"mutant {m[0]}: snippet not found exactly once in {m[1]}: {m[2]!r}")
        for m in mutants:
            status, secs, failed = run_mutant(root, m, args.python, args.timeout)
            dead = status in ("killed", "timeout")
            killed += dead
            if not dead:
                survivors.append((m[0], status))
            print(f"{m[0]:34s} {status:9s} {secs:6.1f}s  {failed[:110]}", flush=True)
    n = len(mutants)
    print(f"\nmutation score: {killed}/{n} killed = {100.0 * killed / max(n, 1):.1f} %")
    if survivors:
        print("survivors:")
        for mid, status in survivors:
            print(f"  {mid} ({status})")
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
