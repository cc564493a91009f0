"""HJB face optimisation as a post-CFG hook: works with any sampler and any base model whose
latents a ComfyUI VAE decodes (Wan: [B, C, T, h, w]; SVD: frames on the batch axis [F, C, h, w])."""

import copy
import logging

import torch

import comfy.model_management
import comfy.utils

from ..likeness_blocks import hjb

log = logging.getLogger("likeness")


def _fresh_module(module, device):
    """A copy with ordinary (non-inference) tensors, frozen: the executor runs under
    inference_mode and stock loaders create inference tensors, which autograd cannot save."""
    with torch.inference_mode(False):
        m = copy.deepcopy(module).to(device)
        for p in m.parameters():
            p.requires_grad_(False)
        return m.eval()


class HJBFaceGuidance:
    """Callable stored in model_options['sampler_post_cfg_function']."""

    def __init__(self, vae, recognizer, reference, face_boxes=None, iterations=3, eta=0.1, strength=1.0,
                 start_percent=0.0, end_percent=0.8, window_margin=4, frames_per_iteration=0, progress=True):
        self.vae = vae
        self.recognizer = recognizer
        self.reference = reference.detach().float().reshape(-1)
        self.face_boxes = face_boxes  # (F_out, 4) output pixels, or None = whole frames
        self.iterations = iterations
        self.eta = eta
        self.strength = strength
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.window_margin = window_margin
        self.frames_per_iteration = frames_per_iteration
        self.progress = progress
        self._modules = None
        self.last_losses = []  # (step index, [loss per iteration]) of the last sampling run

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; the VAE and recognizer must be shared
        return self

    # --- when ---------------------------------------------------------------------------
    @staticmethod
    def step_index(args):
        sigmas = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
        if sigmas is None:
            return None, None
        sigma = float(args["sigma"].reshape(-1)[0])
        i = int(torch.argmin((sigmas.float().cpu() - sigma).abs()))
        return i, len(sigmas) - 1

    def active(self, i, total):
        return self.strength != 0 and self.iterations > 0 and i is not None and (
            self.start_percent * total <= i <= self.end_percent * total)

    # --- how ----------------------------------------------------------------------------
    def _decoder(self, device):
        if self._modules is None or self._modules[0] != device:
            self._modules = (device, _fresh_module(self.vae.first_stage_model, device),
                             _fresh_module(self.recognizer, device))
        return self._modules[1], self._modules[2]

    def _frames(self, decoder, raw):
        """Decoded pixels in 0..1 as (N, 3, H, W) plus how many frames per batch element."""
        out = self.vae.process_output(decoder.decode(raw.to(self.vae.vae_dtype)).float())
        if out.ndim == 5:  # [B, 3, T, H, W]
            b, c, t, h, w = out.shape
            return out.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), t
        return out, out.shape[0]

    def __call__(self, args):
        denoised = args["denoised"]
        i, total = self.step_index(args)
        if not self.active(i, total):
            return denoised
        if i <= self.start_percent * total + 1e-9:
            self.last_losses = []
        model = args["model"]
        device = denoised.device
        decoder, recognizer = self._decoder(device)
        lr = hjb.hjb_learning_rate(i, total, self.eta)
        video_layout = denoised.ndim == 5
        lat_h, lat_w = denoised.shape[-2:]
        up = self.vae.spacial_compression_decode() if hasattr(self.vae, "spacial_compression_decode") else 8
        boxes_all = self.face_boxes
        if boxes_all is None:
            boxes_all = torch.tensor([[0, 0, lat_w * up, lat_h * up]])
        y0, y1, x0, x1 = hjb.latent_window(boxes_all, up, self.window_margin, lat_h, lat_w)
        n_latent_frames = denoised.shape[0]
        bar = comfy.utils.ProgressBar(self.iterations) if self.progress else None

        def between(it):
            comfy.model_management.throw_exception_if_processing_interrupted()

        def loss_fn(z, it):
            zc = z[..., y0:y1, x0:x1]
            sel = None
            if not video_layout and 0 < self.frames_per_iteration < n_latent_frames:
                k = self.frames_per_iteration
                stride = n_latent_frames / k
                sel = torch.tensor([int((j + (it % 2) * 0.5) * stride) % n_latent_frames for j in range(k)], device=z.device)
                zc = zc[sel]
            frames, per_video = self._frames(decoder, model.process_latent_out(zc))
            idx = torch.arange(frames.shape[0]) % per_video if sel is None else sel.cpu()
            boxes = boxes_all[idx % len(boxes_all)].clone()
            boxes[:, [0, 2]] -= x0 * up
            boxes[:, [1, 3]] -= y0 * up
            emb = recognizer(hjb.crop_faces(frames, boxes))
            loss = hjb.identity_loss(emb, self.reference.to(emb.device))
            if bar is not None:
                bar.update(1)
            return loss

        with torch.inference_mode(False), torch.enable_grad():
            x0_ref, losses = hjb.refine_x0(denoised.clone(), loss_fn, self.iterations, lr, between)
        self.last_losses.append((i, losses))
        refined = x0_ref.to(denoised.dtype)
        return denoised + self.strength * (refined - denoised)


def apply_hjb(model, hook):
    m = model.clone()
    m.set_model_sampler_post_cfg_function(hook)
    return m
