"""3D face geometry: DECA -> FLAME vertices, FLAME shape edit, preview render, .ply import/export."""

import os

import torch

from ..comfy_compat import io
from ._types import DecaFlame, FaceEmbeds, FlameVertices

CATEGORY = "Likeness/Geometry"

CROP_FANTASYID = "fantasyid (whole image resized to 224)"
CROP_BOX = "deca standard (InsightFace face box)"
KEEP_ALL = "shape + expression + pose (FantasyID)"
KEEP_ID = "identity only (neutral pose and expression)"
SLIDER_HELP = {
    "face_width": "Cheek-to-cheek width. Positive widens the face.",
    "jaw_sharpness": "How much narrower the jaw is than the cheeks. Positive gives a sharper, V-shaped jawline.",
    "face_length": "Forehead-to-chin length. Positive lengthens the face.",
    "chin_forward": "How far the chin sits forward. Positive pushes the chin out.",
}


def _device():
    import comfy.model_management as mm

    return mm.get_torch_device()


class LikenessDecaFlameLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..loaders.flame import deca_file_list, flame_file_list

        return io.Schema(
            node_id="LikenessDecaFlameLoader",
            display_name="Load DECA + FLAME",
            category=CATEGORY,
            description=(
                "Loads DECA's coarse encoder (E_flame from deca_model.tar, models/deca) and the FLAME head model "
                "(generic_model.pkl or its .npz/.safetensors conversion, models/flame). The FLAME pickle is read "
                "without chumpy through an allow-list (anything that would run code is refused). Both files are "
                "licensed: register at flame.is.tue.mpg.de and get DECA from its project page."
            ),
            inputs=[
                io.Combo.Input("deca_model", options=deca_file_list(), tooltip="DECA checkpoint (deca_model.tar) in models/deca."),
                io.Combo.Input("flame_model", options=flame_file_list(),
                               tooltip="FLAME generic_model.pkl (FLAME 2020) or its .npz/.safetensors conversion in models/flame."),
            ],
            outputs=[DecaFlame.Output(display_name="deca_flame", tooltip="DECA encoder + FLAME layer + shape sliders.")],
        )

    @classmethod
    def execute(cls, deca_model, flame_model):
        from ..loaders.flame import load_deca_flame

        return io.NodeOutput(load_deca_flame(deca_model, flame_model))


def _pick_face_box(face_embeds, index, size_hw):
    faces = [f for f in face_embeds.faces if f.image_index == index]
    if not faces:
        raise ValueError(
            f"FACE_EMBEDS has no face for image {index}; use crop '{CROP_FANTASYID}' or give an image with a visible face."
        )
    if face_embeds.image_sizes and index < len(face_embeds.image_sizes):
        fh, fw = face_embeds.image_sizes[index]
        if (int(fh), int(fw)) != tuple(size_hw):
            raise ValueError(
                f"face_embeds were detected on a {fw}x{fh} image but image {index} is {size_hw[1]}x{size_hw[0]}; "
                "connect the same IMAGE to ArcFace Embed and to this node."
            )
    best = max(faces, key=lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1])))
    return best.bbox.tolist()


def deca_inputs(image, crop, face_embeds=None):
    """IMAGE (B,H,W,C) -> (B,3,224,224) crops for DECA."""
    from ..likeness_blocks.deca import crop_square, deca_box_square, resize_whole

    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"image must be an IMAGE batch (B,H,W,3); got shape {tuple(image.shape)}.")
    chw = image[..., :3].permute(0, 3, 1, 2).float()
    if crop == CROP_FANTASYID:
        return resize_whole(chw)
    if crop == CROP_BOX:
        if face_embeds is None:
            raise ValueError(
                f"crop '{CROP_BOX}' needs face_embeds: connect ArcFace Embed's FACE_EMBEDS (made from this same image)."
            )
        out = []
        for i in range(chw.shape[0]):
            cx, cy, size = deca_box_square(_pick_face_box(face_embeds, i, chw.shape[-2:]), "bbox")
            out.append(crop_square(chw[i], cx, cy, size))
        return torch.stack(out).clamp(0, 1)
    raise ValueError(f"unknown crop mode {crop!r}")


class LikenessDecaFlameVertices(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessDecaFlameVertices",
            display_name="DECA FLAME Vertices",
            category=CATEGORY,
            description=(
                "Regresses FLAME parameters from each image with DECA and returns the 5023 FLAME vertices. "
                "Keep 'shape + expression + pose' to match FantasyID (its point clouds include head rotation, jaw "
                "and expression); 'identity only' zeroes pose and expression so only the face shape remains. "
                "FantasyID's own crop is the whole image resized to 224 (what its released model saw); DECA's "
                "standard crop is a square around the face box (centre moved down 0.12, side x1.25)."
            ),
            inputs=[
                DecaFlame.Input("deca_flame", tooltip="From Load DECA + FLAME."),
                io.Image.Input("image", tooltip="Reference photo(s); one vertex set per image."),
                io.Combo.Input("crop", options=[CROP_FANTASYID, CROP_BOX], default=CROP_FANTASYID,
                               tooltip="How the 224x224 DECA input is cut from the image. The InsightFace box needs face_embeds."),
                io.Combo.Input("keep", options=[KEEP_ALL, KEEP_ID], default=KEEP_ALL,
                               tooltip="Keep DECA's expression and global/jaw pose (as FantasyID), or identity only."),
                FaceEmbeds.Input("face_embeds", optional=True,
                                 tooltip="FACE_EMBEDS from ArcFace Embed on the same image; its face box drives the standard crop."),
            ],
            outputs=[
                FlameVertices.Output(display_name="flame_vertices", tooltip="Vertices (B,5023,3) and the FLAME parameters."),
                io.Image.Output(display_name="deca_input", tooltip="The 224x224 crops DECA saw."),
            ],
        )

    @classmethod
    def execute(cls, deca_flame, image, crop, keep, face_embeds=None):
        from ..likeness_blocks.flame import FlameVertices as FV

        crops = deca_inputs(image, crop, face_embeds)
        dev = _device()
        deca_flame.to(dev)
        codes = deca_flame.encode(crops.to(dev))
        full = keep == KEEP_ALL
        verts = deca_flame.vertices(codes, keep_pose_expression=full)
        out = FV(
            vertices=verts.float().cpu(),
            faces=deca_flame.flame.faces.cpu(),
            shape=codes["shape"].float().cpu(),
            expression=(codes["exp"] if full else torch.zeros_like(codes["exp"])).float().cpu(),
            pose=(codes["pose"] if full else torch.zeros_like(codes["pose"])).float().cpu(),
            cam=codes["cam"].float().cpu(),
            meta={"crop": crop, "keep": keep, "source": "deca"},
        )
        return io.NodeOutput(out, crops.permute(0, 2, 3, 1).cpu().contiguous())


def _slider_inputs():
    return [
        io.Float.Input(name, default=0.0, min=-5.0, max=5.0, step=0.05,
                       tooltip=f"{text} In standard deviations of the FLAME shape space (0 = unchanged).")
        for name, text in SLIDER_HELP.items()
    ]


class LikenessFlameShapeEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFlameShapeEdit",
            display_name="FLAME Shape Edit",
            category=CATEGORY,
            description=(
                "Edits the identity shape of FLAME vertices. Named sliders move the shape coefficients along the "
                "direction that changes a measurement (face width, jaw taper, face length, chin) fastest; the "
                "directions are computed from the loaded FLAME basis when it is loaded. shape_coefficients adds "
                "to single coefficients ('0: 1.5, 3: -2'). Vertices from DECA are re-posed exactly; vertex sets "
                "without parameters (a .ply) get the shape offsets added directly (exact for neutral-pose heads)."
            ),
            inputs=[
                FlameVertices.Input("flame_vertices", tooltip="Vertices from DECA FLAME Vertices or Load FLAME Ply."),
                DecaFlame.Input("deca_flame", tooltip="The FLAME model (its shape basis) from Load DECA + FLAME."),
                *_slider_inputs(),
                io.String.Input("shape_coefficients", default="", multiline=False,
                                tooltip="Direct edits 'index: value, ...' added to the shape coefficients (0-based)."),
            ],
            outputs=[FlameVertices.Output(display_name="flame_vertices", tooltip="Edited vertices and parameters.")],
        )

    @classmethod
    def execute(cls, flame_vertices, deca_flame, face_width=0.0, jaw_sharpness=0.0, face_length=0.0,
                chin_forward=0.0, shape_coefficients=""):
        from ..likeness_blocks.flame_edit import parse_coefficients

        flame = deca_flame.flame
        n = deca_flame.n_shape
        v = flame_vertices.vertices
        if v.shape[1] != flame.num_vertices:
            raise ValueError(
                f"flame_vertices have {v.shape[1]} vertices but the FLAME model has {flame.num_vertices}; "
                "edit vertex sets made with the same FLAME model."
            )
        delta = torch.zeros(n)
        values = {"face_width": face_width, "jaw_sharpness": jaw_sharpness, "face_length": face_length,
                  "chin_forward": chin_forward}
        for name, value in values.items():
            if value and name in deca_flame.sliders:
                delta += float(value) * deca_flame.sliders[name]["direction"][:n].cpu()
        for i, val in parse_coefficients(shape_coefficients, n, where="FLAME Shape Edit").items():
            delta[i] += val
        b = v.shape[0]
        dev = flame.v_template.device
        meta = dict(flame_vertices.meta)
        meta["edit"] = {k: float(x) for k, x in values.items() if x} | ({"coefficients": shape_coefficients} if shape_coefficients else {})
        with torch.no_grad():
            if flame_vertices.shape is not None:
                shape = flame_vertices.shape.float().clone()
                shape[:, :n] += delta
                verts = flame(shape=shape.to(dev), expression=None if flame_vertices.expression is None else flame_vertices.expression.to(dev),
                              pose=None if flame_vertices.pose is None else flame_vertices.pose.to(dev)).cpu()
                return io.NodeOutput(flame_vertices.replace(vertices=verts, shape=shape, meta=meta))
            offs = flame.shape_offsets(delta[None].to(dev)).cpu()
            verts = v + offs
        faces = flame_vertices.faces if flame_vertices.faces is not None else flame.faces.cpu()
        return io.NodeOutput(flame_vertices.replace(vertices=verts, faces=faces, meta=meta))


class LikenessFlamePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFlamePreview",
            display_name="FLAME Preview",
            category=CATEGORY,
            description="Renders FLAME vertices to an IMAGE (shaded, z-buffered, orthographic camera) so you can see the 3D face.",
            inputs=[
                FlameVertices.Input("flame_vertices", tooltip="Vertices to draw; one image per vertex set."),
                io.Int.Input("width", default=512, min=64, max=2048, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=64, max=2048, step=8, tooltip="Image height in pixels."),
                io.Float.Input("yaw", default=0.0, min=-180.0, max=180.0, step=1.0, tooltip="Turn the head left/right (degrees)."),
                io.Float.Input("pitch", default=0.0, min=-90.0, max=90.0, step=1.0, tooltip="Tilt the head up/down (degrees)."),
                io.Combo.Input("draw", options=["mesh", "points"], default="mesh",
                               tooltip="Shaded triangle mesh (needs faces) or depth-shaded points."),
                DecaFlame.Input("deca_flame", optional=True,
                                tooltip="Supplies the FLAME triangles when the vertices carry none (e.g. a .ply point cloud)."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The rendered head(s).")],
        )

    @classmethod
    def execute(cls, flame_vertices, width, height, yaw, pitch, draw, deca_flame=None):
        from ..likeness_blocks.mesh_render import render_mesh

        faces = flame_vertices.faces
        if faces is None and deca_flame is not None and deca_flame.flame.num_vertices == flame_vertices.vertices.shape[1]:
            faces = deca_flame.flame.faces.cpu()
        if draw == "points":
            faces = None
        imgs = [render_mesh(v, faces, width, height, yaw, pitch) for v in flame_vertices.vertices]
        return io.NodeOutput(torch.stack(imgs))


class LikenessSaveFlamePly(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessSaveFlamePly",
            display_name="Save FLAME Ply",
            category=CATEGORY,
            description=(
                "Saves each vertex set as a .ply in the output folder: binary little-endian doubles x, y, z, the "
                "point-cloud format FantasyID reads. Triangles can be added for viewing in mesh tools."
            ),
            inputs=[
                FlameVertices.Input("flame_vertices", tooltip="Vertices to save."),
                io.String.Input("filename_prefix", default="likeness/flame", tooltip="Path prefix under the output folder."),
                io.Boolean.Input("with_faces", default=False, tooltip="Also write the triangles (FantasyID needs only points)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, flame_vertices, filename_prefix, with_faces=False):
        import folder_paths

        from ..likeness_blocks.ply import write_ply

        out_dir = folder_paths.get_output_directory()
        full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        os.makedirs(full_folder, exist_ok=True)
        results = []
        faces = flame_vertices.faces if with_faces else None
        for b, v in enumerate(flame_vertices.vertices):
            name = f"{filename}_{counter + b:05}_.ply"
            write_ply(os.path.join(full_folder, name), v.double().numpy(), None if faces is None else faces.numpy())
            results.append({"filename": name, "subfolder": subfolder, "type": "output"})
        return io.NodeOutput(ui={"ply": results})


def _input_plys():
    import folder_paths

    base = folder_paths.get_input_directory()
    if not os.path.isdir(base):
        return []
    return sorted(f for f in os.listdir(base) if f.lower().endswith(".ply") and os.path.isfile(os.path.join(base, f)))


class LikenessLoadFlamePly(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessLoadFlamePly",
            display_name="Load FLAME Ply",
            category=CATEGORY,
            description="Loads a .ply vertex set (e.g. a FantasyID asset point cloud) from the input folder as FLAME_VERTICES.",
            inputs=[io.Combo.Input("ply", options=_input_plys(), tooltip=".ply file in ComfyUI's input folder.")],
            outputs=[FlameVertices.Output(display_name="flame_vertices", tooltip="The loaded vertices (no FLAME parameters).")],
        )

    @classmethod
    def _path(cls, ply):
        import folder_paths

        from ..loaders.model_folders import resolve_in_roots

        return resolve_in_roots([folder_paths.get_input_directory()], ply, "Load FLAME Ply: ply",
                                "ComfyUI's input folder", hint="Copy the .ply into the input folder and pick it.")

    @classmethod
    def fingerprint_inputs(cls, ply):
        try:
            return os.path.getmtime(cls._path(ply))
        except (ValueError, OSError):
            return float("nan")

    @classmethod
    def execute(cls, ply):
        from ..likeness_blocks.flame import FlameVertices as FV
        from ..likeness_blocks.ply import read_ply
        from ..loaders.safe_files import reading

        path = cls._path(ply)
        with reading(path, "Load FLAME Ply: ply", "Give a .ply point cloud (e.g. one written by Save FLAME Ply)."):
            verts, faces = read_ply(path)
        return io.NodeOutput(FV(vertices=torch.from_numpy(verts)[None],
                                faces=None if faces is None else torch.from_numpy(faces),
                                meta={"source": ply}))


class LikenessFlameConvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..loaders.flame import flame_file_list

        return io.Schema(
            node_id="LikenessFlameConvert",
            display_name="Convert FLAME Model",
            category=CATEGORY,
            description=(
                "Converts FLAME's generic_model.pkl into a plain-array .npz or .safetensors next to it in models/flame "
                "(no pickle needed to load it afterwards). The converted file is still FLAME data under its licence."
            ),
            inputs=[
                io.Combo.Input("flame_model", options=flame_file_list(), tooltip="The FLAME file to convert."),
                io.Combo.Input("format", options=["safetensors", "npz"], default="safetensors", tooltip="Output format."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the converted file was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, flame_model, format):
        from ..loaders.flame import convert_flame

        path = convert_flame(flame_model, format)
        return io.NodeOutput(path, ui={"text": [path]})


NODES = [
    LikenessDecaFlameLoader,
    LikenessDecaFlameVertices,
    LikenessFlameShapeEdit,
    LikenessFlamePreview,
    LikenessSaveFlamePly,
    LikenessLoadFlamePly,
    LikenessFlameConvert,
]
