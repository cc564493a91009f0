"""CogVideoX nodes: load the transformer as a native MODEL, its VAE as a native VAE, encode text with the
T5-XXL file loaded by ComfyUI's CLIPLoader, I2V start-image conditioning, empty latent, diffusers LoRA."""

import os

import torch

from ..comfy_compat import io

CATEGORY = "Likeness/CogVideoX"
COG_FOLDER = "cogvideox"
MAX_RES = 8192
TEXT_TOKENS = 226


# ---------------------------------------------------------------- model lists

def _roots(kind):
    import folder_paths

    from ..loaders.model_folders import model_folder_paths

    roots = list(folder_paths.get_folder_paths(kind)) if kind in folder_paths.folder_names_and_paths else []
    try:
        roots += [r for r in model_folder_paths(COG_FOLDER) if r not in roots]
    except KeyError:
        pass
    return roots


# a diffusers pipeline folder is listed as itself ("CogVideoX-5b-I2V/"), the form the docs give, not as its subfolder
PIPELINE_SUBFOLDERS = {"diffusion_models": ("transformer", "transformer_ema"), "vae": ("vae",)}


def _list_models(kind):
    """Diffusers folders (shown with a trailing '/'; a pipeline folder as itself and as its subfolder) and single .safetensors files under
    the `kind` folders and models/cogvideox. A folder counts when it holds config.json next to .safetensors."""
    found = set()

    def is_model_dir(path, filenames=None):
        names = filenames if filenames is not None else (os.listdir(path) if os.path.isdir(path) else [])
        return "config.json" in names and any(f.endswith(".safetensors") for f in names)

    for root in _roots(kind):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            has_cfg = is_model_dir(dirpath, filenames)
            pipeline = rel != "." and any(is_model_dir(os.path.join(dirpath, sub))
                                          for sub in PIPELINE_SUBFOLDERS.get(kind, ()) if sub in dirnames)
            if pipeline:  # its transformer/ (vae/) subfolder stays listed too, for graphs saved with that form
                found.add(rel.replace(os.sep, "/") + "/")
            if has_cfg and rel != ".":
                found.add(rel.replace(os.sep, "/") + "/")
                continue
            for f in filenames:
                if f.endswith((".safetensors", ".sft")) and not has_cfg:
                    found.add(os.path.join(rel, f).replace(os.sep, "/") if rel != "." else f)
    return sorted(found)


def _resolve(kind, name):
    for root in _roots(kind):
        path = os.path.join(root, name.rstrip("/"))
        if os.path.exists(path):
            return path
    raise ValueError(f"'{name}' was not found in models/{kind} or models/{COG_FOLDER}; refresh the node list "
                     "(press R) or check the file is there.")


# ---------------------------------------------------------------- nodes

class LikenessLoadCogVideoX(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessLoadCogVideoX",
            display_name="Load CogVideoX",
            category=CATEGORY,
            description="Loads a diffusers-format CogVideoX transformer (folder with config.json, or a single "
                        ".safetensors file) as a native MODEL for KSampler: CogVideoX-2B/5B, 5B-I2V and FantasyID's "
                        "transformer (its face modules are kept aside for the FantasyID nodes). Sample with "
                        "sampler ddim (or euler) and scheduler simple to follow CogVideoX's DDIM schedule.",
            inputs=[
                io.Combo.Input("model_name", options=_list_models("diffusion_models"),
                               tooltip="Folder (ends with '/') or .safetensors file in models/diffusion_models or "
                                       "models/cogvideox."),
                io.Combo.Input("weight_dtype", options=["default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"],
                               default="default",
                               tooltip="Storage dtype of the weights; 'default' lets ComfyUI choose for your device. "
                                       "fp8 stores weights in 8 bits and computes in bf16/fp16."),
            ],
            outputs=[io.Model.Output(tooltip="CogVideoX as a native model (v-prediction, zero-terminal-SNR schedule).")],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype="default"):
        from ..loaders.cogvideox import load_transformer

        return io.NodeOutput(load_transformer(_resolve("diffusion_models", model_name), weight_dtype))


class LikenessLoadCogVideoXVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessLoadCogVideoXVAE",
            display_name="Load CogVideoX VAE",
            category=CATEGORY,
            description="Loads CogVideoX's 3D VAE (diffusers folder or .safetensors file) as a native VAE: the stock "
                        "VAE Encode / VAE Decode / VAE Decode (Tiled) nodes work with it. 4x time, 8x space, 16 channels.",
            inputs=[
                io.Combo.Input("vae_name", options=_list_models("vae"),
                               tooltip="Folder (ends with '/') or .safetensors file in models/vae or models/cogvideox."),
                io.Boolean.Input("diffusers_tiling", default=False,
                                 tooltip="Use diffusers' own spatial tiling inside the VAE (less memory for large videos)."),
            ],
            outputs=[io.Vae.Output(tooltip="CogVideoX VAE (raw latents; the model applies the scaling factor).")],
        )

    @classmethod
    def execute(cls, vae_name, diffusers_tiling=False):
        from ..loaders.cogvideox import load_vae

        return io.NodeOutput(load_vae(_resolve("vae", vae_name), diffusers_tiling=diffusers_tiling))


def t5_tokens_226(clip, text):
    """CogVideoX's prompt tokens: T5 tokens of `text`, cut to 225 + end token, padded with 0 to 226
    (what diffusers' pipeline does with padding='max_length', truncation=True)."""
    tokens = clip.tokenize(text)
    if not isinstance(tokens, dict) or "t5xxl" not in tokens:
        raise ValueError("The CLIP input is not a T5-XXL text encoder: load t5xxl (fp16/fp8) with the stock "
                         "'Load CLIP' node, type 'sd3'.")
    flat = [tw for batch in tokens["t5xxl"] for tw in batch]
    body = []
    for tw in flat:
        tok = tw[0]
        if isinstance(tok, int) and tok in (0, 1):  # pad / end
            if tok == 1:
                break
            continue
        body.append(tuple(tw[:2]))
    body = body[: TEXT_TOKENS - 1] + [(1, 1.0)]
    body += [(0, 1.0)] * (TEXT_TOKENS - len(body))
    out = {k: [] for k in tokens}
    out["t5xxl"] = [body]
    return out


class LikenessCogVideoXTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessCogVideoXTextEncode",
            display_name="CogVideoX Text Encode",
            category=CATEGORY,
            description="Encodes a prompt for CogVideoX with T5 v1.1 XXL: 226 tokens (truncated / zero-padded, no "
                        "attention mask), as CogVideoX's pipeline does. Load the T5-XXL file you use for SD3/Flux with "
                        "the stock 'Load CLIP' node, type 'sd3'.",
            inputs=[
                io.Clip.Input("clip", tooltip="T5-XXL from 'Load CLIP' (type sd3)."),
                io.String.Input("text", multiline=True, default="", tooltip="The prompt (empty for a negative prompt)."),
            ],
            outputs=[io.Conditioning.Output(tooltip="[1, 226, 4096] text conditioning.")],
        )

    @classmethod
    def execute(cls, clip, text):
        cm = getattr(clip, "cond_stage_model", None)
        if getattr(cm, "t5_attention_mask", False):
            raise ValueError("This T5 was loaded with an attention mask; CogVideoX uses none. Load it with 'Load CLIP' "
                             "type 'sd3'.")
        cond = clip.encode_from_tokens_scheduled(t5_tokens_226(clip, text))
        return io.NodeOutput(cond)


class LikenessCogVideoXI2VConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessCogVideoXI2VConditioning",
            display_name="CogVideoX I2V Conditioning",
            category=CATEGORY,
            description="Image-to-video conditioning for CogVideoX-5B-I2V and FantasyID: the start image is VAE-encoded "
                        "as one latent frame; the model gets it concatenated on channels, followed by zero frames. "
                        "Also returns the empty video latent.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Positive text conditioning (CogVideoX Text Encode)."),
                io.Conditioning.Input("negative", tooltip="Negative text conditioning (CogVideoX Text Encode)."),
                io.Vae.Input("vae", tooltip="The CogVideoX VAE."),
                io.Image.Input("start_image", tooltip="First frame; resized (center crop) to width x height."),
                io.Int.Input("width", default=720, min=16, max=MAX_RES, step=16, tooltip="Video width in pixels (multiple of 16)."),
                io.Int.Input("height", default=480, min=16, max=MAX_RES, step=16, tooltip="Video height in pixels (multiple of 16)."),
                io.Int.Input("length", default=49, min=1, max=MAX_RES, step=4, tooltip="Frames (4k+1; 49 for CogVideoX-5B)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Videos per batch."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="Positive with the start-image latent."),
                io.Conditioning.Output(display_name="negative", tooltip="Negative with the start-image latent."),
                io.Latent.Output(display_name="latent", tooltip="Empty video latent [B, 16, (length-1)/4+1, h/8, w/8]."),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, vae, start_image, width, height, length, batch_size=1):
        import comfy.model_management
        import comfy.utils
        import node_helpers

        _check_size(width, height, length)
        img = comfy.utils.common_upscale(start_image[:1].movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
        image_latent = vae.encode(img[:, :, :, :3])
        if image_latent.ndim != 5 or image_latent.shape[1] != 16:
            raise ValueError("The VAE input must be the CogVideoX VAE (16-channel video latents); got latents of shape "
                             f"{tuple(image_latent.shape)}.")
        positive = node_helpers.conditioning_set_values(positive, {"concat_latent_image": image_latent})
        negative = node_helpers.conditioning_set_values(negative, {"concat_latent_image": image_latent})
        latent = torch.zeros([batch_size, 16, (length - 1) // 4 + 1, height // 8, width // 8],
                             device=comfy.model_management.intermediate_device())
        return io.NodeOutput(positive, negative, {"samples": latent})


def _check_size(width, height, length):
    if width % 16 or height % 16:
        raise ValueError(f"CogVideoX needs width and height that are multiples of 16 (got {width}x{height}).")
    if (length - 1) % 4:
        raise ValueError(f"CogVideoX video length must be 4k+1 frames (1, 5, 9, ..., 49); got {length}.")


class LikenessEmptyCogVideoXLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessEmptyCogVideoXLatent",
            display_name="Empty CogVideoX Latent",
            category=CATEGORY,
            description="Empty text-to-video latent for CogVideoX: [B, 16, (length-1)/4+1, height/8, width/8].",
            inputs=[
                io.Int.Input("width", default=720, min=16, max=MAX_RES, step=16, tooltip="Video width in pixels (multiple of 16)."),
                io.Int.Input("height", default=480, min=16, max=MAX_RES, step=16, tooltip="Video height in pixels (multiple of 16)."),
                io.Int.Input("length", default=49, min=1, max=MAX_RES, step=4, tooltip="Frames (4k+1; 49 for CogVideoX-5B)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Videos per batch."),
            ],
            outputs=[io.Latent.Output(tooltip="Zero latent for KSampler.")],
        )

    @classmethod
    def execute(cls, width, height, length, batch_size=1):
        import comfy.model_management

        _check_size(width, height, length)
        latent = torch.zeros([batch_size, 16, (length - 1) // 4 + 1, height // 8, width // 8],
                             device=comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": latent})


class LikenessCogVideoXLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="LikenessCogVideoXLoraLoader",
            display_name="CogVideoX LoRA Loader",
            category=CATEGORY,
            description="Applies a CogVideoX LoRA in diffusers/PEFT format (transformer.<module>.lora_A/lora_B) or "
                        "ComfyUI format to a CogVideoX MODEL (on a copy).",
            inputs=[
                io.Model.Input("model", tooltip="A model from 'Load CogVideoX'."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip="LoRA file in models/loras."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="LoRA strength (1.0 = as trained)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the LoRA applied.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength=1.0):
        import comfy.utils
        import folder_paths

        from ..loaders.cogvideox import apply_lora, get_extras

        if get_extras(model) is None:
            raise ValueError("'model' is not a CogVideoX model from 'Load CogVideoX'; use the stock LoRA loader for other models.")
        if strength == 0:
            return io.NodeOutput(model)
        lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", lora_name), safe_load=True)
        patched, _n = apply_lora(model, lora, strength)
        return io.NodeOutput(patched)


NODES = [
    LikenessLoadCogVideoX,
    LikenessLoadCogVideoXVAE,
    LikenessCogVideoXTextEncode,
    LikenessCogVideoXI2VConditioning,
    LikenessEmptyCogVideoXLatent,
    LikenessCogVideoXLoraLoader,
]
