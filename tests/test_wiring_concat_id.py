"""Concat-ID on native Wan 2.1 at a realistic, non-square latent grid (issue 17).

Wan 480x832 gives a 60x104 latent, 30x52 tokens; here the same shape scaled down (6x10 latent, 3x5 tokens, one
reference, strength 0.5): with height != width a swap of the grid's rows and columns anywhere in the reference RoPE
positions changes the output, which every square-latent test lets through. The expected output is the plain
formula forward of tests/test_concat_id.py (independent of the pack), and the positions are checked against a
table written out here loop by loop.
"""

import importlib
import math

import pytest
import torch

from likeness_blocks.concat_id import concat_id_positions
from test_concat_id import TEXT_DIM, make_state_dict, reference_forward

T, LAT_H, LAT_W = 2, 6, 10  # 60x104-shaped, scaled down: rows != columns


@pytest.fixture(scope="module")
def cm(comfy, pack):
    class NS:
        wan = importlib.import_module("likeness_pack.adapters.wan")
        loader = importlib.import_module("likeness_pack.loaders.concat_id")

    return NS


@pytest.fixture(scope="module")
def files(cm, tmp_path_factory):
    d = tmp_path_factory.mktemp("concat_id_wiring")
    torch.save(make_state_dict(False, seed=13), d / "first_stage.pt")
    torch.save(make_state_dict(True, seed=14), d / "second_stage_adaln.pt")
    return d


def _inputs(seed=21, n_refs=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, T, LAT_H, LAT_W, generator=g)
    refs = torch.randn(1, 16, n_refs, LAT_H, LAT_W, generator=g)
    ctx = torch.randn(1, 5, TEXT_DIM, generator=g)
    return x, refs, torch.tensor([811.0]), ctx


def _run(patcher, x, refs, t, ctx):
    import comfy.patcher_extension

    to = dict(patcher.model_options["transformer_options"])
    to["wrappers"] = comfy.patcher_extension.merge_nested_dicts({}, patcher.wrappers, copy_dict1=False)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, t, ctx, time_dim_concat=refs, transformer_options=to)


def test_positions_on_a_non_square_grid():
    t, h, w = 2, 3, 5
    want = [(f, i, j) for f in range(t) for i in range(h) for j in range(w)]
    want += [(t, i, w + j) for i in range(h) for j in range(w)]  # the reference: right of the frame, rows 0..h-1
    assert concat_id_positions(t, h, w, 1).tolist() == [list(p) for p in want]
    want2 = want + [(t + 1, i, w + j) for i in range(h) for j in range(w)]
    assert concat_id_positions(t, h, w, 2, "next_frames").tolist() == [list(p) for p in want2]
    want3 = want + [(t, i, 2 * w + j) for i in range(h) for j in range(w)]
    assert concat_id_positions(t, h, w, 2, "side_by_side").tolist() == [list(p) for p in want3]


@pytest.mark.parametrize("variant", ["first_stage", "adaln"])
def test_non_square_latent_parity_at_strength_half(cm, files, variant):
    name = "first_stage.pt" if variant == "first_stage" else "second_stage_adaln.pt"
    sd = torch.load(files / name, weights_only=True)
    model, weights = cm.loader.load_concat_id(str(files / name), model_options={"dtype": torch.float32})
    x, refs, t, ctx = _inputs()
    patched = cm.wan.apply_concat_id(model, adaln=weights.adaln, strength=0.5)
    got = _run(patched, x, refs, t, ctx)
    want = reference_forward(sd, x, refs, t, ctx, adaln=variant == "adaln", strength_log=math.log(0.5))
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    full = _run(cm.wan.apply_concat_id(model, adaln=weights.adaln), x, refs, t, ctx)
    assert (full - got).abs().max() > 1e-3, "strength 0.5 must differ from strength 1"


def test_the_grid_is_not_square_enough_to_hide_a_swap(cm, files, monkeypatch):
    """The parity above can fail: the same formula forward with the reference placed at columns h..2h-1 (height and
    width swapped) is clearly different on this grid."""
    import test_concat_id as ref_mod

    sd = torch.load(files / "first_stage.pt", weights_only=True)
    x, refs, t, ctx = _inputs()
    right = reference_forward(sd, x, refs, t, ctx, adaln=False)
    table = ref_mod._ref_freqs

    def swapped(T_, h, w, n_refs, head_dim):
        tab = table(T_, h, w, n_refs, head_dim).clone()
        c = head_dim // 2
        n_w = c // 3
        lv = T_ * h * w
        # column index of the reference tokens from the swapped table: h + j instead of w + j
        cols = torch.tensor([h + j for i in range(h) for j in range(w)] * n_refs)
        inv = 1.0 / 10000.0 ** (torch.arange(n_w, dtype=torch.float64) * 2 / (2 * n_w))
        tab[lv:, c - n_w:] = torch.polar(torch.ones(len(cols), n_w, dtype=torch.float64), cols[:, None].double() * inv)
        return tab

    monkeypatch.setattr(ref_mod, "_ref_freqs", swapped)
    wrong = reference_forward(sd, x, refs, t, ctx, adaln=False)
    assert (right - wrong).abs().max() > 1e-2


def test_two_references_side_by_side_non_square(cm, files):
    sd = torch.load(files / "first_stage.pt", weights_only=True)
    model, _ = cm.loader.load_concat_id(str(files / "first_stage.pt"), model_options={"dtype": torch.float32})
    x, refs, t, ctx = _inputs(seed=5, n_refs=2)
    got = _run(cm.wan.apply_concat_id(model, placement="next_frames"), x, refs, t, ctx)
    torch.testing.assert_close(got, reference_forward(sd, x, refs, t, ctx, adaln=False), atol=1e-5, rtol=0)
