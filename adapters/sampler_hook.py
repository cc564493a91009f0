"""HJB face optimisation as a post-CFG hook: works with any sampler and any base model whose
latents a ComfyUI VAE decodes (Wan: [B, C, T, h, w]; SVD: frames on the batch axis [F, C, h, w])."""

import contextlib
import copy
import functools
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


def _sd_resnet_blocks(module):
    """The SD-family VAE's resnet blocks in module (SVD's temporal VideoResBlock included); none in Wan's causal VAE,
    whose blocks are other classes."""
    try:
        from comfy.ldm.modules.diffusionmodules.model import ResnetBlock
    except ImportError:
        return []
    return [m for m in module.modules() if isinstance(m, ResnetBlock)]


def _checkpoint_resnet_blocks(module):
    """Gradient checkpointing on the SD-family VAE's resnet blocks of our private decoder copy, as upstream turns on
    for HJB: each block keeps only its input for the backward pass and recomputes the rest, the same result in a
    fraction of the memory. Blocks with caches (Wan's causal VAE) stay as they are."""
    from torch.utils.checkpoint import checkpoint

    for m in _sd_resnet_blocks(module):
        inner = m.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        m.forward = forward


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


CPUINFO = "/proc/cpuinfo"  # where the CPU's flags are read (a module constant so tests can hand it a fake file)


def cpuinfo_has_bf16(text):
    """Whether /proc/cpuinfo text lists AVX512-BF16 or AMX-BF16 among a CPU's flags (whole flag names only)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and {"avx512_bf16", "amx_bf16"} & set(value.split()):
            return True
    return False


@functools.lru_cache(maxsize=None)  # asked at every decode; /proc/cpuinfo once
def _has_fast_bf16(device):
    """bf16 matrix units: CUDA from Ampere on; CPUs with AVX512-BF16 or AMX (oneDNN uses them)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8)
    if device.type == "cpu":
        try:
            with open(CPUINFO) as f:
                return cpuinfo_has_bf16(f.read())
        except OSError:
            return False
    return False


def decode_dtype(precision, device):
    """The dtype the HJB decode runs in: 'auto' is bf16 where the device computes it fast, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"HJB Face Guidance: precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if _has_fast_bf16(device) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _channels_last_convs(module):
    """2-D conv weights in channels-last layout: oneDNN and cuDNN run these convolutions (and above all their
    backward) faster so, with the same arithmetic. Used on the SD-family decoder only (Conv3d weights stay)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)


class WanCausalLayout:
    """The Wan 2.1 VAE's walk along time in one ComfyUI version: which function sizes the feature cache, which
    latent frames go into each decoder call, and how a call's output comes back."""

    def __init__(self, count_cache, first_alone_then_pairs):
        self.count_cache = count_cache
        self.first_alone_then_pairs = first_alone_then_pairs

    def chunks(self, n_latent):
        if not self.first_alone_then_pairs:  # 0.3.75: one latent frame per call
            return [(t, t + 1) for t in range(n_latent)]
        # >= 0.3x (count_cache_layers): frame 0 alone, then pairs; the causal caches hold two frames and only a
        # decode in these chunks reproduces the VAE's own result
        return [(0, 1)] + [(s, min(s + 2, n_latent)) for s in range(1, n_latent, 2)]

    def new_cache(self, decoder):
        return [None] * self.count_cache(decoder.decoder)

    @staticmethod
    def decode(decoder, raw, cache):
        out = decoder.decoder(decoder.conv2(raw), feat_cache=cache, feat_idx=[0])
        return torch.cat(list(out), 2) if isinstance(out, (list, tuple)) else out


def wan_causal_layout(decoder):
    """(WanCausalLayout, None) for a Wan 2.1 VAE of a known layout, else (None, why not)."""
    try:
        import comfy.ldm.wan.vae as wan_vae
    except ImportError:
        return None, "this ComfyUI has no comfy.ldm.wan.vae"
    if not isinstance(decoder, getattr(wan_vae, "WanVAE", ())):
        return None, f"the VAE ({type(decoder).__name__}) is not Wan 2.1's causal video VAE"
    if not (hasattr(decoder, "conv2") and hasattr(decoder, "decoder")):
        return None, "this ComfyUI's Wan VAE has no conv2/decoder modules (an unknown layout)"
    if hasattr(wan_vae, "count_cache_layers"):
        return WanCausalLayout(wan_vae.count_cache_layers, first_alone_then_pairs=True), None
    if hasattr(wan_vae, "count_conv3d"):
        return WanCausalLayout(wan_vae.count_conv3d, first_alone_then_pairs=False), None
    return None, "this ComfyUI's Wan VAE has neither count_conv3d nor count_cache_layers (an unknown layout)"



class HJBFaceGuidance:
    """Callable stored in model_options['sampler_post_cfg_function']."""

    def __init__(self, vae, recognizer, reference, face_boxes=None, iterations=3, eta=0.1, strength=1.0,
                 start_percent=0.0, end_percent=0.8, window_margin=4, frames_per_iteration=0, progress=True,
                 detector=None, det_threshold=0.5, framewise=True, decode_chunk=4, precision="auto"):
        self.vae = vae
        self.recognizer = recognizer
        self.reference = reference.detach().float().reshape(-1)
        self.face_boxes = face_boxes  # (F_out, 4) output pixels; None: detector boxes, else whole frames
        self.detector = detector  # InsightFace pack: boxes found on a preview decode at the first active step
        self.det_threshold = det_threshold
        self.framewise = framewise  # back-propagate piecewise: along time (Wan), per decode chunk (SVD)
        self.decode_chunk = max(1, int(decode_chunk))  # frames per temporal-decoder call, frames-on-batch layouts
        decode_dtype(precision, torch.device("cpu"))  # an unknown name fails here, not mid-sampling
        self.precision = precision
        self._sd_family = False  # set with the decoder copy: SD-family decoders get channels-last inputs
        self._run_boxes = None
        self._segment_boxes = {}  # context windows: detector boxes per piece of the video, per sampling run
        self._last_step = None
        self.iterations = iterations
        self.eta = eta
        self.strength = strength
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.window_margin = window_margin
        self.frames_per_iteration = frames_per_iteration
        self.progress = progress
        self._modules = None
        self._warned_whole_decode = False
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
            with torch.inference_mode(False):  # the executor samples under inference mode; these copies need autograd
                # an fp32 master copy: reduced precision is autocast around the decode (see _autocast)
                decoder = _fresh_module(self.vae.first_stage_model, device).float()
                if self.framewise:
                    _checkpoint_resnet_blocks(decoder)
                self._sd_family = bool(_sd_resnet_blocks(decoder))
                if self._sd_family:
                    _channels_last_convs(decoder)
                self._modules = (device, decoder, _fresh_module(self.recognizer, device))
        return self._modules[1], self._modules[2]

    def _autocast(self, device):
        """The decode in reduced precision where asked ('auto': bf16 on devices with bf16 units) by autocast's
        rules, fp32 master weights; the face crops, ArcFace, the loss and Adam stay fp32.
        How far this moves the result is measured in docs/hjb.md and bounded in tests/test_hjb.py."""
        dtype = decode_dtype(self.precision, device)
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def _decoder_input(self, raw):
        raw = raw.float()
        if raw.ndim == 4 and self._sd_family:
            raw = raw.contiguous(memory_format=torch.channels_last)
        return raw

    def _causal_video_vae(self, decoder):
        """How this ComfyUI's Wan 2.1 VAE walks time, for the exact low-memory decode (None: decode whole).
        Its internals are not a public API and changed between the versions we test, so the layout is read
        off the module; anything else decodes the whole window with autograd, said once in the log."""
        layout, why = wan_causal_layout(decoder)
        if layout is None and why and not self._warned_whole_decode:
            self._warned_whole_decode = True
            log.warning("HJB Face Guidance: low_memory_decode is on, but %s; decoding the whole latent window with "
                        "autograd instead: the same result, with memory that grows with the number of frames "
                        "(every decoder activation of every frame is kept for the backward pass).", why)
        return layout

    def _framewise_loss(self, decoder, layout, raw_of, n_latent, frame_loss):
        """Exact loss and gradient of the whole-video decode with one decoder call's activations alive at a
        time: a first pass without autograd keeps the causal cache entering each call (the same time chunks
        as the VAE's own decode); then, from the last chunk back, each is decoded again from its cache with
        autograd and back-propagated together with the gradient its output cache received from the later
        chunks (checkpointing along time)."""
        total_out = 1 + 4 * (n_latent - 1)
        chunks = layout.chunks(n_latent)

        def decode_chunk(s, e, cache):
            raw = raw_of(s, e).float()
            with self._autocast(raw.device):
                return layout.decode(decoder, raw, cache)

        entering = []
        cache = layout.new_cache(decoder)
        with torch.no_grad():
            for s, e in chunks:
                # the decoder replaces entries, never edits them in place; newer ones keep views of a whole
                # call's activations, so keep compact copies (the same values, only the cached frames alive)
                cache[:] = [c.clone() if torch.is_tensor(c) else c for c in cache]
                entering.append(list(cache))
                decode_chunk(s, e, cache)
        loss_sum, grad_out = 0.0, None
        for (s, e), cache_in in reversed(list(zip(chunks, entering))):
            leaves = [c.detach().requires_grad_(True) if torch.is_tensor(c) else c for c in cache_in]
            cache = list(leaves)
            video = self.vae.process_output(decode_chunk(s, e, cache).float())  # [B, 3, n, H, W]
            b, c, n, h, w = video.shape
            first = 0 if s == 0 else 1 + 4 * (s - 1)
            frames = video.permute(0, 2, 1, 3, 4).reshape(b * n, c, h, w)
            loss = frame_loss(frames, (torch.arange(b * n) % n) + first) * (n / total_out)
            tensors, grads = [loss], [torch.ones_like(loss)]
            if grad_out is not None:
                for out_c, g in zip(cache, grad_out):
                    if g is not None and torch.is_tensor(out_c) and out_c.requires_grad:
                        tensors.append(out_c)
                        grads.append(g)
            torch.autograd.backward(tensors, grads)
            grad_out = [leaf.grad if torch.is_tensor(leaf) else None for leaf in leaves]
            loss_sum += float(loss.detach())
        return loss_sum

    def _frames(self, decoder, raw):
        """Decoded pixels in 0..1 as (N, 3, H, W) plus how many frames per batch element."""
        with self._autocast(raw.device):
            out = decoder.decode(self._decoder_input(raw))
        out = self.vae.process_output(out.float()).contiguous()
        if out.ndim == 5:  # [B, 3, T, H, W]
            b, c, t, h, w = out.shape
            return out.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), t
        return out, out.shape[0]

    def detect_boxes(self, decoder, model, denoised):
        """Largest face per output frame of a full preview decode; frames without one get the
        nearest frame's box (whole frame when no frame has a face, as upstream's fallback)."""
        from ..likeness_blocks.face_embed import detect_with_retries, to_bgr_uint8

        with torch.no_grad():
            frames, _ = self._frames(decoder, model.process_latent_out(denoised))
        h, w = frames.shape[-2:]
        found = []
        for f in frames:
            boxes, _kps, _used, _tried = detect_with_retries(self.detector, to_bgr_uint8(f.permute(1, 2, 0)), 640,
                                                             self.det_threshold)
            if len(boxes):
                areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
                found.append(hjb.detector_box(boxes[int(areas.argmax()), :4], w, h))
            else:
                found.append(None)
        have = [k for k, b in enumerate(found) if b is not None]
        if not have:
            log.warning("HJB Face Guidance: no face found in the preview decode; optimising whole frames")
            return torch.tensor([[0, 0, w, h]])
        if len(have) < len(found):
            log.warning("HJB Face Guidance: no face in %d of %d preview frames; using the nearest frame's box",
                        len(found) - len(have), len(found))
        return torch.tensor([found[min(have, key=lambda k: abs(k - j))] for j in range(len(found))])

    def _check_mask_count(self, denoised):
        """face_mask: 1 (every frame) or one per output frame; anything else would cycle silently."""
        n_masks = len(self.face_boxes)
        if n_masks == 1:
            return
        n_out = denoised.shape[0]  # frames on the batch axis (SVD)
        if denoised.ndim == 5:
            ratio = getattr(self.vae, "upscale_ratio", None)
            t = denoised.shape[2]
            if isinstance(ratio, (tuple, list)) and len(ratio) == 3:
                n_out = int(ratio[0](t)) if callable(ratio[0]) else int(ratio[0]) * t
            else:
                return  # unknown decoder: frame_loss checks each index instead
        if n_masks != n_out:
            raise ValueError(f"HJB Face Guidance: face_mask has {n_masks} masks but the video has {n_out} frames; "
                             "give one mask (used for every frame) or exactly one per frame.")

    # --- context windows ------------------------------------------------------------------
    @staticmethod
    def time_segments(denoised, model_options):
        """[(start, stop)] along the time axis when the sampler uses ComfyUI's context windows (Context Windows
        (Manual) / WAN Context Windows): the fused prediction is refined in near-equal pieces no longer than one
        window, so memory follows the window, not the video. None: one piece (the whole video)."""
        handler = (model_options or {}).get("context_handler")
        if handler is None:
            return None
        axis = 2 if denoised.ndim == 5 else 0
        length = int(getattr(handler, "context_length", 0) or 0)
        n = denoised.shape[axis]
        if getattr(handler, "dim", None) != axis:
            log.warning("HJB Face Guidance: the context windows run on dim %s but this model's frames are on dim %d; "
                        "refining the whole video at once (memory follows the video length)",
                        getattr(handler, "dim", None), axis)
            return None
        if length < 1 or n <= length:
            return None
        k = -(-n // length)
        bounds = [round(j * n / k) for j in range(k + 1)]
        return [(bounds[j], bounds[j + 1]) for j in range(k)]

    def __call__(self, args):
        denoised = args["denoised"]
        i, total = self.step_index(args)
        if not self.active(i, total):
            return denoised
        if i <= self.start_percent * total + 1e-9:
            self.last_losses = []
        new_run = self._run_boxes is None or self._last_step is None or i <= self._last_step
        self._last_step = i
        if self.face_boxes is not None:  # against the whole video, before any window-sized piece
            self._check_mask_count(denoised)
        segments = self.time_segments(denoised, args.get("model_options"))
        if segments is None:
            refined, losses = self._refine(args["model"], denoised, i, total, new_run, 0)
            self.last_losses.append((i, losses))
            return refined
        axis = 2 if denoised.ndim == 5 else 0
        tc = 1
        if axis == 2:
            tc = (self.vae.temporal_compression_decode() if hasattr(self.vae, "temporal_compression_decode") else None) or 4
        if new_run:
            self._segment_boxes = {}
        parts, losses = [], None
        n = denoised.shape[axis]
        for start, stop in segments:
            # a piece decoded on its own: its output frame j is the video's frame tc*start + j (Wan: the first
            # latent frame of a piece decodes to one frame, the last of that latent's group in the whole video)
            part, part_losses = self._refine(args["model"], denoised.narrow(axis, start, stop - start), i, total,
                                             new_run, tc * start, segment=start)
            parts.append(part)
            w = (stop - start) / n
            losses = [w * l for l in part_losses] if losses is None else [a + w * l for a, l in zip(losses, part_losses)]
        self.last_losses.append((i, losses))
        return torch.cat(parts, axis)

    def _refine(self, model, denoised, i, total, new_run, frame_offset, segment=None):
        """HJB on one piece of the prediction (the whole video outside context windows); ``frame_offset``: the
        video output frame of the piece's first decoded frame (face boxes follow it)."""
        device = denoised.device
        decoder, recognizer = self._decoder(device)
        lr = hjb.hjb_learning_rate(i, total, self.eta)
        video_layout = denoised.ndim == 5
        lat_h, lat_w = denoised.shape[-2:]
        up = self.vae.spacial_compression_decode() if hasattr(self.vae, "spacial_compression_decode") else 8
        boxes_all = self.face_boxes
        if boxes_all is None and self.detector is not None:
            if segment is None:
                if new_run:  # a new sampling run
                    self._run_boxes = self.detect_boxes(decoder, model, denoised)
                boxes_all = self._run_boxes
            else:  # each piece's own preview decode: its frames, its boxes
                if segment not in self._segment_boxes:
                    self._segment_boxes[segment] = self.detect_boxes(decoder, model, denoised)
                self._run_boxes = boxes_all = self._segment_boxes[segment]
            frame_offset = 0
        if boxes_all is None:
            boxes_all = torch.tensor([[0, 0, lat_w * up, lat_h * up]])
        elif frame_offset and len(boxes_all) > 1:
            n_out = denoised.shape[0] if not video_layout else None
            if n_out is None:
                tc = self.vae.temporal_compression_decode() if hasattr(self.vae, "temporal_compression_decode") else None
                n_out = 1 + (tc or 4) * (denoised.shape[2] - 1)
            boxes_all = boxes_all[(torch.arange(n_out) + frame_offset) % len(boxes_all)]
        y0, y1, x0, x1 = hjb.latent_window(boxes_all, up, self.window_margin, lat_h, lat_w)
        n_latent_frames = denoised.shape[0]
        bar = comfy.utils.ProgressBar(self.iterations) if self.progress else None

        def between(it):
            comfy.model_management.throw_exception_if_processing_interrupted()

        def frame_loss(frames, out_index):
            if len(boxes_all) > 1 and int(out_index.max()) >= len(boxes_all):
                raise ValueError(f"HJB Face Guidance: face_mask has {len(boxes_all)} masks but frame "
                                 f"{int(out_index.max())} needs one; give one mask (every frame) or one per frame.")
            boxes = boxes_all[out_index % len(boxes_all)].clone()
            boxes[:, [0, 2]] -= x0 * up
            boxes[:, [1, 3]] -= y0 * up
            return hjb.identity_loss(hjb.face_embeddings(recognizer, frames, boxes), reference)

        causal = self._causal_video_vae(decoder) if (self.framewise and video_layout) else None

        def loss_fn(z, it):
            if bar is not None:
                bar.update(1)
            if causal is not None:
                return self._framewise_loss(
                    decoder, causal,
                    lambda s, e: z[:, :, s:e, y0:y1, x0:x1] * latent_scale[:, :, :1] + latent_shift[:, :, :1],
                    z.shape[2], frame_loss)
            zc = z[..., y0:y1, x0:x1]
            if video_layout:
                frames, per_video = self._frames(decoder, zc * latent_scale + latent_shift)
                return frame_loss(frames, torch.arange(frames.shape[0]) % per_video)
            idx = torch.arange(n_latent_frames)
            if 0 < self.frames_per_iteration < n_latent_frames:
                k = self.frames_per_iteration
                stride = n_latent_frames / k
                idx = torch.tensor([int((j + (it % 2) * 0.5) * stride) % n_latent_frames for j in range(k)])
            # Frames on the batch axis (SVD): the temporal decoder mixes the frames of one decode call, so decode in
            # upstream's chunks (decode_chunk_size 4, num_frames = chunk). Low-memory: back-propagate each chunk
            # before decoding the next (the same loss and gradient, one chunk's activations alive).
            chunks = [idx[c:c + self.decode_chunk] for c in range(0, len(idx), self.decode_chunk)]
            total, loss_sum = len(idx), 0.0
            for part in chunks:
                frames, _ = self._frames(decoder, zc[part.to(z.device)] * latent_scale + latent_shift)
                loss = frame_loss(frames, part) * (len(part) / total)
                if not self.framewise:
                    loss_sum = loss_sum + loss  # one backward over every chunk, as upstream
                    continue
                loss.backward()
                loss_sum += float(loss.detach())
            return loss_sum

        with torch.inference_mode(False), torch.enable_grad():
            reference = self.reference.to(device).clone()  # the node made it under inference mode
            # process_latent_out is affine per channel in every latent format; its constants were
            # made at load time under inference mode, so take them as ordinary tensors
            probe = torch.zeros_like(denoised[:1, ..., :1, :1])
            latent_shift = model.process_latent_out(probe).clone()
            latent_scale = model.process_latent_out(probe + 1).clone() - latent_shift
            x0_ref, losses = hjb.refine_x0(denoised.clone(), loss_fn, self.iterations, lr, between)
        refined = x0_ref.to(denoised.dtype)
        return denoised + self.strength * (refined - denoised), losses



def apply_hjb(model, hook):
    m = model.clone()
    m.set_model_sampler_post_cfg_function(hook)
    return m
