"""Face nodes: Load InsightFace, ArcFace Embed, Load Differentiable ArcFace, Identity Metrics."""

import json
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..comfy_compat import SHOWS_RESULT, io, ui
from ._types import ArcFaceTorch, FaceEmbeds, InsightFace

log = logging.getLogger("likeness")
CATEGORY = "Likeness/Face"


def _pack_options():
    from ..loaders.insightface import list_packs

    try:
        packs = list_packs()
    except Exception:  # listing must never break the node list
        packs = []
    return packs or ["antelopev2"]


def _require(value, name, what, fix):
    if value is None:
        raise ValueError(f"'{name}' is not connected: it needs {what}. {fix}")
    return value


class LoadInsightFace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..loaders.insightface import PROVIDERS

        packs = _pack_options()
        return io.Schema(
            node_id="LikenessLoadInsightFace",
            display_name="Load InsightFace",
            category=CATEGORY,
            description=(
                "Loads an InsightFace model pack (face detection + ArcFace recognition) from "
                "ComfyUI/models/insightface/models/<pack>/ and reports which ONNX Runtime provider really runs it."
            ),
            inputs=[
                io.Combo.Input("model_name", options=packs, default="antelopev2" if "antelopev2" in packs else packs[0],
                               tooltip="Pack folder under models/insightface/models/: antelopev2 (glintr100, what FantasyID, "
                                       "StableAnimator and ConsisID use) or buffalo_l; any folder with a detection and a recognition .onnx works."),
                io.Combo.Input("provider", options=list(PROVIDERS), default="auto",
                               tooltip="Where ONNX Runtime runs the models. 'auto' takes the first GPU provider installed, else CPU. "
                                       "A provider that is not installed or fails to start falls back to CPU; the status output says so."),
            ],
            outputs=[
                InsightFace.Output(display_name="insightface"),
                io.String.Output(display_name="status"),
            ],
            **SHOWS_RESULT,
        )

    @classmethod
    def execute(cls, model_name, provider="auto"):
        from ..loaders.insightface import load_pack

        pack, status = load_pack(model_name, provider)
        return io.NodeOutput(pack, status, ui=ui.PreviewText(status))


class ArcFaceEmbed(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..likeness_blocks.face_embed import FACE_CHOICES

        return io.Schema(
            node_id="LikenessArcFaceEmbed",
            display_name="ArcFace Embed",
            category=CATEGORY,
            description=(
                "Finds faces in reference images and computes their ArcFace identity embeddings (FACE_EMBEDS), "
                "with aligned 112x112 crops, larger aligned crops and a face mask. Retries detection at smaller sizes."
            ),
            inputs=[
                InsightFace.Input("insightface", tooltip="The pack from Load InsightFace."),
                io.Image.Input("image", tooltip="Reference image(s) of the person. RGB, RGBA (alpha ignored) or grayscale; every image in the batch is used."),
                io.Combo.Input("face_choice", options=list(FACE_CHOICES), default="largest",
                               tooltip="Which face to keep per image: the largest, the one at face_index counting from the left, "
                                       "or all faces (several identities)."),
                io.Int.Input("face_index", default=0, min=0, max=63,
                             tooltip="With 'by index': 0 = leftmost face, 1 = the next one to its right, ..."),
                io.Combo.Input("on_no_face", options=["error", "skip image"], default="error",
                               tooltip="'error' stops with the index of the image that has no (such) face; 'skip image' "
                                       "drops it and lists it in the report (at least one face must remain)."),
                io.Int.Input("det_size", default=640, min=160, max=1280, step=32,
                             tooltip="Detector input size. If nothing is found, detection is retried at 480 and 320 "
                                     "(helps with faces that fill the frame)."),
                io.Float.Input("threshold", default=0.5, min=0.05, max=0.99, step=0.01,
                               tooltip="Detection confidence threshold; lower it for hard faces (profile, blur, small)."),
                io.Int.Input("crop_size", default=512, min=112, max=2048, step=16,
                             tooltip="Size of the larger aligned crop output (same alignment as the 112 crop, scaled)."),
                ArcFaceTorch.Input("recognizer", optional=True,
                                   tooltip="For HJB Face Guidance only: the recogniser from Load Differentiable ArcFace that "
                                           "HJB will optimise (CurricularFace IR-101 .bin, or a torch ArcFace). Connected: "
                                           "the faces are embedded by it, each detected box cropped and resized to 112 "
                                           "exactly as HJB crops decoded frames, and face_embeds is marked as made by it "
                                           "(other nodes refuse it). Unconnected: the pack's ArcFace on aligned crops."),
            ],
            outputs=[
                FaceEmbeds.Output(display_name="face_embeds"),
                io.Image.Output(display_name="aligned_112"),
                io.Image.Output(display_name="aligned_crop"),
                io.Mask.Output(display_name="face_mask"),
                io.String.Output(display_name="report"),
            ],
            **SHOWS_RESULT,
        )

    @classmethod
    def execute(cls, insightface, image, face_choice="largest", face_index=0, on_no_face="error", det_size=640,
                threshold=0.5, crop_size=512, recognizer=None):
        from ..likeness_blocks.face_embed import embed_faces

        _require(insightface, "insightface", "an InsightFace pack", "Connect a Load InsightFace node.")
        _require(image, "image", "a reference image", "Connect a Load Image node.")
        if recognizer is not None and not (callable(recognizer) and hasattr(recognizer, "kind")):
            raise ValueError(f"'recognizer' is a {type(recognizer).__name__}, not a recogniser: connect Load "
                             "Differentiable ArcFace's output, or unplug it to embed with the pack's ArcFace.")
        fe, crops, large, masks, report = embed_faces(
            insightface, image, face_choice=face_choice, face_index=int(face_index),
            skip_missing=(on_no_face == "skip image"), det_size=int(det_size), threshold=float(threshold),
            crop_size=int(crop_size), input_name="image", recognizer=recognizer,
        )
        if fe.skipped:
            log.warning("Likeness ArcFace Embed skipped images without a face: %s", fe.skipped)
        return io.NodeOutput(fe, crops, large, masks, report, ui=ui.PreviewText(report))


class LoadDifferentiableArcFace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..loaders.insightface import list_arcface_sources

        try:
            sources = list_arcface_sources()
        except Exception:
            sources = []
        sources = sources or ["insightface/antelopev2/glintr100.onnx"]
        return io.Schema(
            node_id="LikenessLoadDifferentiableArcFace",
            display_name="Load Differentiable ArcFace",
            category=CATEGORY,
            description=(
                "A torch ArcFace recogniser that gradients can flow through (for StableAnimator's HJB face optimisation), "
                "converted from the pack's recognition ONNX or loaded from a torch iresnet checkpoint (glintr100_torch.pth); "
                "or CurricularFace IR-101 (glint360k_curricular_face_r101_backbone.bin) for FaceSim-Cur and for HJB, "
                "whose reference ArcFace Embed then makes with this recogniser connected to its 'recognizer'."
            ),
            inputs=[
                io.Combo.Input("source", options=sources, default=sources[0],
                               tooltip="insightface/<pack>/<file>.onnx converts that recognition ONNX to torch (its embeddings match "
                                       "onnxruntime's); stableanimator/glintr100_torch.pth (or any iresnet state dict) loads safely "
                                       "with weights_only."),
            ],
            outputs=[ArcFaceTorch.Output(display_name="arcface")],
        )

    @classmethod
    def execute(cls, source):
        from ..loaders.insightface import load_arcface_torch

        return io.NodeOutput(load_arcface_torch(source))


IDENTITY_MODES = ("one (references averaged)", "one per reference")
GATE_ON = ("similarity", "facesim_arc", "facesim_cur", "drift", "weakest identity")


def _finite(value, name):
    if not math.isfinite(float(value)):
        raise ValueError(f"'{name}' is {value}; give a finite number.")
    return float(value)


class IdentityMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..likeness_blocks.metrics import PROTOCOLS

        return io.Schema(
            node_id="LikenessIdentityMetrics",
            display_name="Identity Metrics",
            category=CATEGORY,
            description=(
                "Measures how well a video keeps the reference identity. protocol 'likeness': per-frame ArcFace cosine "
                "to the reference (FantasyID RS / StableAnimator CSIM / Concat-ID ArcSim), inter-frame similarity, face "
                "motion. 'consisid' / 'opens2v': FaceSim-Arc and FaceSim-Cur exactly as those benchmarks' scripts compute "
                "them (16 / 32 uniformly sampled frames, det size 320, largest face, grey-pad retry, max(0, cos); "
                "OpenS2V drops clipped Cur zeros but keeps Arc zeros). Also per-second similarity and drift, several "
                "identities, and a pass/fail gate. See docs/metrics.md."
            ),
            is_output_node=True,
            inputs=[
                InsightFace.Input("insightface", tooltip="Face detector + ArcFace. For the benchmark protocols use buffalo_l "
                                                         "(det_10g + w600k_r50), what both scripts load by default."),
                FaceEmbeds.Input("reference", optional=True,
                                 tooltip="protocol 'likeness': reference faces from ArcFace Embed (same pack). Several faces "
                                         "are averaged into one identity, or are one identity each (identities)."),
                io.Image.Input("video", tooltip="The generated frames (an IMAGE batch, e.g. from VAE Decode or Load Video)."),
                io.Int.Input("det_size", default=640, min=160, max=1280, step=32,
                             tooltip="protocol 'likeness': detector input size (retried at 480 and 320). "
                                     "The benchmark protocols always use 320."),
                io.Float.Input("threshold", default=0.5, min=0.05, max=0.99, step=0.01,
                               tooltip="protocol 'likeness': detection confidence threshold. The benchmark protocols use 0.5."),
                io.Int.Input("batch_size", default=64, min=1, max=1024, optional=True,
                             tooltip="Faces per recognition batch; 1 runs frame by frame (slower, same numbers)."),
                io.Combo.Input("protocol", options=list(PROTOCOLS), default="likeness", optional=True,
                               tooltip="likeness: every frame, our alignment. consisid: ConsisID's eval (16 frames). "
                                       "opens2v: OpenS2V-Eval (32 frames; its leaderboard FaceSim is FaceSim-Cur). "
                                       "The benchmark protocols need reference_image, and recognizer for FaceSim-Cur."),
                io.Image.Input("reference_image", optional=True,
                               tooltip="consisid / opens2v: the reference photo(s), processed as the scripts do (largest face, "
                                       "pad-and-retry). Several images = several identities (identities: one per reference) "
                                       "or their Arc/Cur embeddings averaged."),
                ArcFaceTorch.Input("recognizer", optional=True,
                                   tooltip="consisid / opens2v: CurricularFace IR-101 (glint360k_curricular_face_r101_backbone.bin "
                                           "from Load Differentiable ArcFace) for FaceSim-Cur. Unconnected: FaceSim-Cur is NaN."),
                io.Float.Input("fps", default=16.0, min=0.1, max=240.0, step=0.1, optional=True,
                               tooltip="Frame rate of the video, for the per-second curve and drift (last second / first second)."),
                io.Combo.Input("identities", options=list(IDENTITY_MODES), default=IDENTITY_MODES[0], optional=True,
                               tooltip="one per reference: every face in a frame is matched to its best reference (greedy, "
                                       "cosine >= match_threshold); per-identity scores, missing frames counted."),
                io.Float.Input("match_threshold", default=0.3, min=-1.0, max=1.0, step=0.01, optional=True,
                               tooltip="Lowest ArcFace cosine at which a face counts as a reference's identity (several identities)."),
                io.Combo.Input("gate_on", options=list(GATE_ON), default="similarity", optional=True,
                               tooltip="The number the pass/fail gate checks: similarity (the protocol's main score), "
                                       "FaceSim-Arc, FaceSim-Cur, drift, or the weakest identity's score."),
                io.Float.Input("gate_threshold", default=0.5, min=-1.0, max=10.0, step=0.01, optional=True,
                               tooltip="passed = the gated number is finite and at least this."),
            ],
            outputs=[
                io.Float.Output(display_name="similarity_mean"),
                io.Float.Output(display_name="inter_frame_mean"),
                io.Float.Output(display_name="face_motion_mean"),
                io.Int.Output(display_name="frames_without_face"),
                io.String.Output(display_name="table_json"),
                io.Image.Output(display_name="plot"),
                io.Float.Output(display_name="facesim_arc"),
                io.Float.Output(display_name="facesim_cur"),
                io.Float.Output(display_name="drift"),
                io.Boolean.Output(display_name="passed"),
                io.String.Output(display_name="summary"),
            ],
        )

    @classmethod
    def execute(cls, insightface, reference=None, video=None, det_size=640, threshold=0.5, batch_size=None,
                protocol="likeness", reference_image=None, recognizer=None, fps=16.0,
                identities=IDENTITY_MODES[0], match_threshold=0.3, gate_on="similarity", gate_threshold=0.5):
        from ..likeness_blocks import metrics as M

        _require(insightface, "insightface", "an InsightFace pack", "Connect a Load InsightFace node.")
        _require(video, "video", "the video frames", "Connect an IMAGE batch.")
        if protocol not in M.PROTOCOLS:
            raise ValueError(f"'protocol' must be one of {', '.join(M.PROTOCOLS)}; got {protocol!r}.")
        fps = _finite(fps, "fps")
        if fps <= 0:
            raise ValueError(f"'fps' is {fps}; give the video's frame rate (> 0).")
        match_threshold = _finite(match_threshold, "match_threshold")
        gate_threshold = _finite(gate_threshold, "gate_threshold")
        several = identities == IDENTITY_MODES[1]
        bs = int(batch_size or 64)
        if protocol == "likeness":
            res = cls._likeness(insightface, reference, video, int(det_size), _finite(threshold, "threshold"), bs,
                                several, match_threshold)
        else:
            res = cls._benchmark(protocol, insightface, reference_image, recognizer, video, bs, several, match_threshold)
        n = res["n_frames"]
        ids, vals = zip(*res["curve"]) if res["curve"] else ((), ())
        secs = M.per_second(ids, vals, fps)
        drift = M.drift(ids, vals, fps, n)
        idents = res["identities"]
        weakest = min((d["score"] for d in idents), default=float("nan")) if idents else float("nan")
        gated = {"similarity": res["similarity"], "facesim_arc": res["facesim_arc"], "facesim_cur": res["facesim_cur"],
                 "drift": drift, "weakest identity": weakest}[gate_on]
        passed = M.gate(gated, gate_threshold)

        def fmt(v):
            return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"

        summary = (f"{'PASS' if passed else 'FAIL'}: {gate_on} {fmt(gated)} {'>=' if passed else 'below'} {gate_threshold:g} "
                   f"({protocol}; {res['main_label']} {fmt(res['similarity'])}; drift {fmt(drift)}; "
                   f"frames without face {res['frames_without_face']}/{res['frames_scored']}"
                   + (f"; identities {', '.join(fmt(d['score']) + ' (missing ' + str(d['missing']) + ')' for d in idents)}" if several else "")
                   + ")")
        if res.get("note"):
            summary += " " + res["note"]
        absent = cls._absent(protocol, res, drift, recognizer)
        if absent:
            summary += " Not computed (NaN): " + "; ".join(f"{k}: {v}" for k, v in absent.items()) + "."
        table = dict(res["json"])
        table["summary"] = {**table.get("summary", {}), "protocol": protocol, "similarity_mean": res["similarity"],
                            "facesim_arc": res["facesim_arc"], "facesim_cur": res["facesim_cur"], "fps": fps,
                            "per_second": [{"second": s, "value": v} for s, v in secs], "drift": drift,
                            "identities": idents, "gate_on": gate_on, "gate_threshold": gate_threshold,
                            "gate_value": gated, "passed": passed, "text": summary, "not_computed": absent}
        table_text = M.clean_json(table)
        title = [f"{protocol}: {res['main_label']} {fmt(res['similarity'])}   FaceSim-Arc {fmt(res['facesim_arc'])}   "
                 f"FaceSim-Cur {fmt(res['facesim_cur'])}",
                 f"drift (last s / first s) {fmt(drift)} at {fps:g} fps   frames without face "
                 f"{res['frames_without_face']} of {res['frames_scored']}   {'PASS' if passed else 'FAIL'} ({gate_on})"]
        series = res["series"]
        plot_np = M.plot_identity(title, n, series, res["no_face"], secs, fps, res.get("face_motion"))
        plot = torch.from_numpy(plot_np.copy()).float().div(255.0).unsqueeze(0)
        return io.NodeOutput(
            float(res["similarity"]), float(res["inter_frame"]), float(res["face_motion_mean"]), int(res["frames_without_face"]),
            table_text, plot, float(res["facesim_arc"]), float(res["facesim_cur"]), float(drift), passed, summary,
            ui={"images": ui.PreviewImage(plot, cls=cls).as_dict()["images"], "text": (summary, table_text)},
        )

    @staticmethod
    def _absent(protocol, res, drift, recognizer):
        """{output: why it is NaN} for every number this run cannot give from the inputs it got."""
        out = {}
        if not math.isfinite(res["facesim_cur"]):
            if protocol == "likeness":
                out["facesim_cur"] = ("protocol 'likeness' scores against the reference FACE_EMBEDS (ArcFace) and has no "
                                      "reference image to embed with CurricularFace" + (" ('recognizer' is not used by it)"
                                                                                       if recognizer is not None else "")
                                      + "; pick consisid/opens2v with reference_image and a CurricularFace recognizer")
            elif recognizer is None:
                out["facesim_cur"] = "no CurricularFace recognizer connected"
        if protocol != "likeness":
            out["inter_frame_mean, face_motion_mean"] = (f"protocol '{protocol}' scores only its sampled frames, as the "
                                                         "benchmark script does; pick protocol 'likeness' for them")
        elif not math.isfinite(res["inter_frame"]):
            out["inter_frame_mean"] = "no two consecutive frames both have a face"
        if not math.isfinite(drift):
            out["drift"] = "no scored face in the first or the last second (or the first second's mean is 0)"
        return out

    @staticmethod
    def _likeness(insightface, reference, video, det_size, threshold, batch_size, several, match_threshold):
        from ..likeness_blocks import metrics as M
        from ..likeness_blocks.face_embed import (all_faces_embedded, frame_embeddings, largest_face_per_frame,
                                                  to_bgr_uint8, to_rgb)

        _require(reference, "reference", "reference FACE_EMBEDS (protocol 'likeness')",
                 "Connect ArcFace Embed's face_embeds output, or pick protocol consisid/opens2v and connect reference_image.")
        if len(reference) == 0:
            raise ValueError("'reference' holds no face; run ArcFace Embed on an image with a face.")
        rec_name = getattr(insightface, "rec_name", "")
        if getattr(reference, "crop", "aligned") != "aligned":
            raise ValueError(
                f"'reference' was embedded by {reference.model_name or 'a Load Differentiable ArcFace recogniser'} "
                f"({getattr(reference, 'recognizer_kind', '?')}, on box crops) through ArcFace Embed's 'recognizer' "
                "input, which is for HJB Face Guidance; protocol 'likeness' scores with the pack's ArcFace. Use an "
                "ArcFace Embed with 'recognizer' unplugged for Identity Metrics."
            )
        if reference.model_name and rec_name and reference.model_name != rec_name:
            raise ValueError(
                f"'reference' was embedded with {reference.model_name} but this pack recognises with {rec_name}; "
                "embeddings of different recognisers cannot be compared. Use the same Load InsightFace for both."
            )
        rgb = to_rgb(video, "video")
        n = rgb.shape[0]
        dets = largest_face_per_frame(insightface, rgb, det_size, threshold)
        ids, emb = frame_embeddings(insightface, rgb, dets, batch_size=batch_size)
        refs = reference.embeddings(normalized=True)
        ref = M.reference_vector(refs)
        if emb.shape[0] and emb.shape[1] != ref.shape[0]:
            raise ValueError(f"Reference embeddings have {ref.shape[0]} values but the pack gives {emb.shape[1]}; use the same pack.")
        cos = M.cosine_to_reference(emb, ref)
        ifs = M.inter_frame_similarity(emb, ids)
        gray = [to_bgr_uint8(rgb[t]).mean(axis=2).astype("uint8") for t in range(n)]
        fm = M.face_motion(gray, [d[0] if d is not None else None for d in dets])
        summary, rows = M.summarize(n, ids, cos.tolist(), ifs, fm, [dets[t][2] for t in ids])
        res = {"n_frames": n, "frames_scored": n, "main_label": "similarity to reference",
               "inter_frame": summary["inter_frame_similarity_mean"], "face_motion_mean": summary["face_motion_mean"],
               "face_motion": fm, "identities": [], "facesim_cur": float("nan")}
        if not several:
            res.update(similarity=summary["similarity_to_reference_mean"], curve=list(zip(ids, cos.tolist())),
                       frames_without_face=summary["frames_without_face"], no_face=summary["frames_without_face_list"],
                       series=[("to reference", list(zip(ids, cos.tolist()))),
                               ("inter-frame (IFS)", [(t, v) for t, v in ifs])])
        else:
            owners, all_emb = all_faces_embedded(insightface, rgb, det_size, threshold, batch_size)
            allcos = F.normalize(all_emb.float(), dim=-1) @ refs.T if owners else torch.zeros(0, refs.shape[0])
            per = {j: [] for j in range(refs.shape[0])}
            curve = []
            for t in sorted(set(owners)):
                mine = [i for i, o in enumerate(owners) if o == t]
                got = M.assign_faces(allcos[mine], match_threshold)
                for j, i in got.items():
                    per[j].append((t, float(allcos[mine[i], j])))
                if got:
                    curve.append((t, float(np.mean([float(allcos[mine[i], j]) for j, i in got.items()]))))
            idents = [{"reference": j, "score": float(np.mean([v for _, v in per[j]])) if per[j] else float("nan"),
                       "found": len(per[j]), "missing": n - len(per[j]), "frames": [t for t, _ in per[j]]} for j in per]
            no_face = [t for t in range(n) if t not in set(owners)]
            res.update(similarity=float(np.mean([d["score"] for d in idents])), curve=curve, identities=idents,
                       frames_without_face=len(no_face), no_face=no_face,
                       series=[(f"identity {j}", per[j]) for j in per])
        res["facesim_arc"] = res["similarity"]
        res["json"] = json.loads(M.table_json(summary, rows))
        return res

    @staticmethod
    def _benchmark(protocol, insightface, reference_image, recognizer, video, batch_size, several, match_threshold):
        from ..likeness_blocks import metrics as M
        from ..likeness_blocks.face_embed import to_rgb

        _require(reference_image, "reference_image", f"the reference photo (protocol '{protocol}')",
                 "Connect a Load Image node with the reference photo; the benchmark scripts detect and crop it themselves.")
        if recognizer is not None and getattr(recognizer, "kind", "arcface") != "curricularface":
            raise ValueError(
                f"'recognizer' is {getattr(recognizer, 'name', 'an ArcFace model')}, but FaceSim-Cur is defined with "
                "CurricularFace IR-101: load glint360k_curricular_face_r101_backbone.bin (models/insightface/) with "
                "Load Differentiable ArcFace, or unplug it (FaceSim-Cur is then n/a)."
            )
        ref_rgb = to_rgb(reference_image, "reference_image")
        rgb = to_rgb(video, "video")
        ref_arc, ref_cur = M.benchmark_reference(insightface, recognizer, ref_rgb, batch_size)
        if not several and ref_arc.shape[0] > 1:  # one identity: the scripts take one image; average its embeddings
            ref_arc = F.normalize(F.normalize(ref_arc.float(), dim=-1).mean(0, keepdim=True), dim=-1)
            ref_cur = F.normalize(ref_cur.mean(0, keepdim=True), dim=-1) if ref_cur is not None else None
        out = M.benchmark_scores(protocol, insightface, recognizer, rgb, ref_arc, ref_cur, several=several,
                                 match_threshold=match_threshold, batch_size=batch_size)
        use_cur = recognizer is not None
        key = "cur" if use_cur else "arc"
        main = out["facesim_cur"] if use_cur else out["facesim_arc"]
        rows = out["frames"]
        no_face = sorted({r["frame"] for r in rows if not r["face"]})
        missing = sum(1 for r in rows if not r["face"])
        idents = [{"reference": j, "score": d["facesim_cur"] if use_cur else d["facesim_arc"], **d}
                  for j, d in enumerate(out["identities"])]
        if several:
            series = [(f"identity {j} ({key})", [(r["frame"], r["identities"][j][key]) for r in rows if j in r["identities"]])
                      for j in range(len(idents))]
        else:
            series = [("FaceSim-Arc per frame", [(r["frame"], r["arc"]) for r in rows if r["face"]])]
            if use_cur:
                series.append(("FaceSim-Cur per frame", [(r["frame"], r["cur"]) for r in rows if r["face"]]))
        note = "" if any(r["face"] for r in rows) else "No sampled frame has a face: the benchmark scripts score this 0.0."
        return {
            "n_frames": rgb.shape[0], "frames_scored": len(rows), "main_label": "FaceSim-Cur" if use_cur else "FaceSim-Arc",
            "similarity": main, "facesim_arc": out["facesim_arc"], "facesim_cur": out["facesim_cur"],
            "inter_frame": float("nan"), "face_motion_mean": float("nan"),
            "curve": [(r["frame"], r[key]) for r in rows if r["face"] and r[key] is not None],
            "identities": idents if several else [], "frames_without_face": missing, "no_face": no_face,
            "series": series, "note": note,
            "json": {"summary": {"frames": rgb.shape[0], "sampled_frames": out["indices"], "frames_with_face": len(rows) - missing,
                                 "frames_without_face": missing},
                     "frames": [{"frame": r["frame"], "face": r["face"], "facesim_arc": r["arc"], "facesim_cur": r["cur"],
                                 "identities": {str(j): v for j, v in r["identities"].items()}} for r in rows]},
        }


NODES = [LoadInsightFace, ArcFaceEmbed, LoadDifferentiableArcFace, IdentityMetrics]
