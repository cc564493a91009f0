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


def _full_path(key, name, help_text):
    import folder_paths

    if not name:
        raise ValueError(f"No {key} file chosen. {help_text}")
    path = folder_paths.get_full_path(key, name)
    if path is None or not os.path.isfile(path):
        raise ValueError(f"The {key} file '{name}' was not found in the {key} model folders. {help_text}")
    return path


def flame_file_list():
    import folder_paths

    return folder_paths.get_filename_list("flame")


def deca_file_list():
    import folder_paths

    return folder_paths.get_filename_list("deca")


def load_flame_layer(name):
    path = _full_path("flame", name, FLAME_HELP)
    return FlameLayer(read_flame_file(path))


def load_deca_flame(deca_name, flame_name):
    flame = load_flame_layer(flame_name)
    encoder = load_deca_encoder(_full_path("deca", deca_name, DECA_HELP))
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
    src = _full_path("flame", name, FLAME_HELP)
    ext = {"npz": ".npz", "safetensors": ".safetensors"}[fmt]
    dst = os.path.splitext(src)[0] + ext
    if os.path.abspath(dst) == os.path.abspath(src):
        raise ValueError(f"'{name}' is already a {fmt} file.")
    return convert_flame_file(src, dst)
