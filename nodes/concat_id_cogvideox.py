"""Concat-ID's CogVideoX-5B variant: SAT checkpoint loader and the model patch. The references come from
the shared 'Concat-ID Conditioning' node (with the CogVideoX VAE)."""

from ..comfy_compat import io

CATEGORY = "Likeness/Concat-ID"


class ConcatIDCogVideoXLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="LikenessConcatIDCogVideoXLoader",
            display_name="Concat-ID CogVideoX Loader (SAT)",
            category=CATEGORY,
            description=(
                "Loads Concat-ID's CogVideoX-5B checkpoint (SAT format: single-identity or two-identities, "
                "mp_rank_00_model_states.pt, from models/concat_id) as a native CogVideoX MODEL: the SAT keys are "
                "mapped to the diffusers layout; the report lists the keys that did not map."
            ),
            inputs=[
                io.Combo.Input("checkpoint", options=folder_paths.get_filename_list("concat_id"),
                               tooltip="The SAT checkpoint file in models/concat_id, e.g. "
                                       "single-identity/<iteration>/mp_rank_00_model_states.pt (or two-identities/...), "
                                       "or the same state dict re-saved as .safetensors."),
                io.Combo.Input("weight_dtype", options=["default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"],
                               default="default",
                               tooltip="Storage dtype of the weights; 'default' lets ComfyUI choose (Concat-ID ran bf16)."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.String.Output(display_name="key_report"),
            ],
        )

    @classmethod
    def execute(cls, checkpoint, weight_dtype="default") -> io.NodeOutput:
        from ..loaders.cogvideox_sat import load_sat_transformer
        from ..loaders.model_folders import resolve_file

        path = resolve_file("concat_id", checkpoint, "Concat-ID CogVideoX Loader: checkpoint",
                            "Put Concat-ID's SAT checkpoint (mp_rank_00_model_states.pt) in models/concat_id.")
        model, mapping = load_sat_transformer(path, weight_dtype)
        return io.NodeOutput(model, mapping.report())


class ConcatIDCogVideoXModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessConcatIDCogVideoXModelPatch",
            display_name="Concat-ID Model Patch (CogVideoX)",
            category=CATEGORY,
            description=(
                "Patches a CogVideoX-5B T2V MODEL (on a clone) to run Concat-ID's reference frames: the clean "
                "reference latents from the Concat-ID conditioner are appended after the video latent frames "
                "(RoPE time indices T, T+1, same spatial grid, same timestep and AdaLN, joint attention with the text) "
                "and their output is cut off before the sampler step. The released checkpoints take 1 "
                "(single-identity) or 2 (two-identities) references."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A CogVideoX T2V MODEL, ideally from Concat-ID CogVideoX Loader (SAT)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling at which the references start being attended (0 = "
                                       "from the first step). Before it the model runs as plain text-to-video."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling after which the references are no longer attended "
                                       "(1 = until the last step)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, start_percent=0.0, end_percent=1.0) -> io.NodeOutput:
        from ..adapters.cogvideox_concat_id import apply_concat_id_cogvideox

        if start_percent > end_percent:
            raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent}); set start <= end.")
        return io.NodeOutput(apply_concat_id_cogvideox(model, start_percent, end_percent))


NODES = [ConcatIDCogVideoXLoader, ConcatIDCogVideoXModelPatch]
