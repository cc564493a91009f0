"""FLAME / DECA files from the pack's model folders -> DECA_FLAME payload."""

import os

from ..likeness_blocks.deca import DecaFlame, load_deca_encoder
from ..likeness_blocks.flame import FlameLayer
from ..likeness_blocks.flame_edit import derive_sliders
from ..likeness_blocks.flame_file import convert_flame_file, read_flame_file

FLAME_HELP = (
    "Put FLAME's generic_model.pkl (register at https://flame.is.tue.mpg.de, FLAME 2020) or its .npz/.safetensors "
    "conversion in ComfyUI/models/flame/."
)
DECA_HELP = (
    "Put DECA's deca_model.tar (from the DECA project, https://github.com/yfeng95/DECA, non-commercial licence) "
    "in ComfyUI/models/deca/."
)


def _full_path(key, name, help_text, what=None):
    from .model_folders import resolve_file

    return resolve_file(key, name, what or f"{key} file", help_text)


def flame_file_list():
    import folder_paths

    return folder_paths.get_filename_list("flame")


def deca_file_list():
    import folder_paths

    return folder_paths.get_filename_list("deca")


def _read_flame(path, what):
    from .safe_files import reading

    with reading(path, what, FLAME_HELP):
        return read_flame_file(path)


def load_flame_layer(name, what="Load DECA + FLAME: flame_model"):
    return FlameLayer(_read_flame(_full_path("flame", name, FLAME_HELP, what), what))


def load_deca_flame(deca_name, flame_name):
    from .safe_files import reading, torch_load

    # both names are checked before either file is read
    what_deca, what_flame = "Load DECA + FLAME: deca_model", "Load DECA + FLAME: flame_model"
    flame_path = _full_path("flame", flame_name, FLAME_HELP, what_flame)
    deca_path = _full_path("deca", deca_name, DECA_HELP, what_deca)
    flame = FlameLayer(_read_flame(flame_path, what_flame))
    if deca_path.lower().endswith(".safetensors"):
        from .safe_files import load_state_dict

        ckpt = load_state_dict(deca_path, what_deca, DECA_HELP)
    else:  # DECA's tar also carries numpy counters/stats: the encoder's own allow-list of numpy types
        from ..likeness_blocks.deca import _numpy_safe_globals
        import torch

        allowed, aliases = _numpy_safe_globals()
        try:
            with torch.serialization.safe_globals(allowed + aliases):
                ckpt = torch_load(deca_path, what_deca, DECA_HELP)
        except TypeError:  # torch < 2.6: no (object, name) aliases
            with torch.serialization.safe_globals(allowed):
                ckpt = torch_load(deca_path, what_deca, DECA_HELP)
    with reading(deca_path, what_deca, DECA_HELP):
        encoder = load_deca_encoder(ckpt, name=os.path.basename(deca_path))
    model = DecaFlame(encoder, flame)
    if flame.n_shape_basis < model.n_shape or flame.n_expr_basis < model.n_exp:
        raise ValueError(
            f"'{flame_name}' has {flame.n_shape_basis} shape and {flame.n_expr_basis} expression components; DECA needs "
            f"{model.n_shape} and {model.n_exp}. Use FLAME 2020's generic_model.pkl."
        )
    model.sliders = derive_sliders(flame, model.n_shape)
    return model


def convert_flame(name, fmt):
    """Converts a FLAME file in the flame folder to .npz/.safetensors next to it; returns the new path."""
    src = _full_path("flame", name, FLAME_HELP, "Convert FLAME Model: flame_model")
    ext = {"npz": ".npz", "safetensors": ".safetensors"}[fmt]
    dst = os.path.splitext(src)[0] + ext
    if os.path.abspath(dst) == os.path.abspath(src):
        raise ValueError(f"'{name}' is already a {fmt} file.")
    from .model_folders import display_path
    from .safe_files import reading

    with reading(src, "Convert FLAME Model: flame_model", FLAME_HELP):
        convert_flame_file(src, dst)
    return display_path(dst)
