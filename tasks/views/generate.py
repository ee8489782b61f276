"""GenView's image variations (METHODS.md 1.2): a diffusers image-variation pipeline, by default Stable
unCLIP 2.1 image-to-image, conditioned on each image's CLIP embedding with the image's own ``noise_level``.

* :func:`load_pipeline` loads the real pipeline from a hub id or a local folder (no download happens when
  ``HF_HUB_OFFLINE=1``: the model must then be in the local cache or at the path), or builds the tiny
  randomly initialised pipeline of :func:`tiny_unclip_pipeline` (``model: tiny-random``) for tests and the
  built-in quickstart: same classes, same code path, a few thousand parameters, no download.
* :func:`view_seed` derives each view's seed from the image id, so a view is reproducible on any worker and
  in any batch.
* :class:`VariationGenerator` is the per-actor callable: loads the pipeline once, groups a batch by noise
  level (the pipeline takes one ``noise_level`` per call), runs each group with one seeded generator per
  image, retries a failed image on its own, and reports an image that still fails with its reason instead
  of raising.

Choices where METHODS.md leaves it open: the prompt is empty by default (the released script passes a
placeholder text to an image-conditioned pipeline, METHODS.md 1.5); variations are stored as JPEG
(quality 95), the same codec family as the curated originals.
"""
from __future__ import annotations

import hashlib
import io
import os
import traceback
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-unclip"
TINY_MODEL = "tiny-random"


@dataclass(frozen=True)
class GenerationSettings:
    """Call arguments of the pipeline (METHODS.md 1.2 defaults: guidance 10, 20 steps, 512 px)."""

    guidance_scale: float = 10.0
    steps: int = 20
    size: int = 512
    prompt: str = ""


def view_seed(image_id: str, base_seed: int = 0, view_index: int = 0) -> int:
    """A 63-bit seed from (base seed, image id, view index): the same id always gives the same view."""
    key = f"{base_seed}:{image_id}" if view_index == 0 else f"{base_seed}:{image_id}#{view_index}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# ------------------------------------------------------------------------------------------ tiny model


def _tiny_tokenizer():
    """A real CLIPTokenizer (the code path of the real pipeline) over CLIP's byte-level alphabet, each
    symbol alone and word-final, with no merges: a complete if merge-free BPE vocabulary, built in memory."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=16)


def tiny_unclip_pipeline(seed: int = 0, size: int = 32):
    """A StableUnCLIPImg2ImgPipeline with tiny random components built from configs (no download).

    CLIP vision/text towers of width 32 with 2 layers, a 2-level UNet (32/64 channels) conditioned on the
    noised image embedding through the class-embedding projection exactly as unCLIP 2.1 is, a 1-level VAE
    (latents at the image size), DDPM noising of the embedding and a v-prediction DDIM sampler, as in the
    real checkpoint's scheduler configs. ``seed`` fixes the random weights.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    width = 32
    tokenizer = _tiny_tokenizer()
    vocab = len(tokenizer)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=width, projection_dim=width, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=2 * width, image_size=size, patch_size=max(1, size // 8)))
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab, hidden_size=width, projection_dim=width, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=2 * width, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        unet = UNet2DConditionModel(
            sample_size=size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4), cross_attention_dim=width, use_linear_projection=True, upcast_attention=True,
            # unCLIP: [noised image embedding, noise-level embedding] -> class embedding
            class_embed_type="projection", projection_class_embeddings_input_dim=2 * width, norm_num_groups=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                            norm_num_groups=8, sample_size=size)
    finally:
        torch.random.set_rng_state(gen_state)
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=width),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
        vae=vae)


# ------------------------------------------------------------------------------------------ loading


def load_pipeline(model: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: torch.dtype | None = None,
                  revision: str | None = None, seed: int = 0):
    """The pipeline for ``model``: ``tiny-random``, a local folder (``save_pretrained`` layout) or a hub id.

    Half precision only on accelerators (fp16 convolutions are slow or missing on CPU). A hub id that is not
    in the local cache raises a ``RuntimeError`` that says what to do instead of the hub's traceback.
    """
    if model == TINY_MODEL:
        pipe = tiny_unclip_pipeline(seed)
    else:
        from diffusers import StableUnCLIPImg2ImgPipeline

        if dtype is None:
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
        try:
            pipe = StableUnCLIPImg2ImgPipeline.from_pretrained(model, dtype=dtype, revision=revision)
        except (OSError, ValueError) as e:
            raise RuntimeError(
                f"cannot load the view generator {model!r}: {type(e).__name__}: {str(e).splitlines()[0]}. "
                f"Give views.model a local folder holding the pipeline (diffusers save_pretrained layout), or "
                f"make the hub id available in the Hugging Face cache; views.model: {TINY_MODEL} runs the "
                f"tiny random pipeline (for tests).") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_fingerprint(pipe, model: str) -> dict[str, str]:
    """What identifies the weights that made a view: the model id or path, the hub revision (commit) when
    it came from the hub cache, and a digest of the weights (a sample of every tensor, so a multi-GB model
    is fingerprinted in well under a second while any retrained or swapped component changes it)."""
    h = hashlib.sha256()
    for name in sorted(pipe.components):
        comp = pipe.components[name]
        if isinstance(comp, torch.nn.Module):
            for key, t in comp.state_dict().items():
                flat = t.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
                h.update(f"{name}.{key}:{tuple(t.shape)}".encode())
                h.update(sample.tobytes())
    name_or_path = getattr(pipe.config, "_name_or_path", "") or model
    revision = ""
    parts = os.path.normpath(str(name_or_path)).split(os.sep)
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):  # hub cache: .../snapshots/<commit>
        revision = parts[parts.index("snapshots") + 1]
    return {"model": model, "revision": revision, "weights_sha256": h.hexdigest()[:16]}


# ------------------------------------------------------------------------------------------ generation


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generate(pipe, images: list[np.ndarray], noise_level: int, seeds: list[int],
             settings: GenerationSettings) -> list[np.ndarray]:
    """One pipeline call: ``images`` (uint8 HxWx3) sharing ``noise_level`` -> variations (uint8, size x size)."""
    from PIL import Image

    gens = [torch.Generator(device=pipe.device).manual_seed(int(s)) for s in seeds]
    out = pipe(image=[Image.fromarray(im) for im in images], prompt=[settings.prompt] * len(images),
               height=settings.size, width=settings.size, num_inference_steps=settings.steps,
               guidance_scale=settings.guidance_scale, noise_level=int(noise_level), generator=gens,
               output_type="np")
    return [np.clip(np.round(im * 255.0), 0, 255).astype(np.uint8) for im in out.images]


class VariationGenerator:
    """Callable class for a Ray Data actor pool: batch ``{id, image (bytes), noise_level[, view_index]}`` ->
    one row per input row ``{id, view_index, view (JPEG bytes, empty on failure), noise_level, seed, error,
    model, revision, weights}`` (the last three: :func:`pipeline_fingerprint`).

    ``retries``: a failed group is retried image by image, each image up to ``retries`` more times; an image
    that still fails gets its reason in ``error`` (the stage quarantines it) and the batch goes on.
    ``fail_ids`` makes those image ids fail on purpose (for tests of the quarantine path only).
    """

    def __init__(self, model: str = DEFAULT_MODEL, settings: dict | None = None, seed: int = 0,
                 device: str = "cpu", threads: int = 0, retries: int = 1, revision: str | None = None,
                 fail_ids: tuple = ()):
        if threads:
            torch.set_num_threads(threads)
        self.settings = GenerationSettings(**(settings or {}))
        self.seed, self.retries, self.fail_ids = seed, retries, set(fail_ids)
        self.pipe = load_pipeline(model, device=device, revision=revision, seed=seed)
        self.fingerprint = pipeline_fingerprint(self.pipe, model)

    def _one_group(self, ids: list[str], images: list[np.ndarray], level: int, seeds: list[int]) -> list[bytes]:
        bad = [i for i in ids if i in self.fail_ids]
        if bad:
            raise RuntimeError(f"injected failure for {bad[0]}")
        return [encode_jpeg(v) for v in generate(self.pipe, images, level, seeds, self.settings)]

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from tasks.data.images import to_square

        ids = [str(i) for i in batch["id"]]
        levels = [int(x) for x in batch["noise_level"]]
        index = [int(x) for x in batch["view_index"]] if "view_index" in batch else [0] * len(ids)
        seeds = [view_seed(i, self.seed, k) for i, k in zip(ids, index)]
        views: list[bytes] = [b""] * len(ids)  # by row: an id may repeat (e.g. several views of one image)
        errors: list[str] = [""] * len(ids)
        images: list[np.ndarray | None] = []
        for j, data in enumerate(batch["image"]):
            try:
                images.append(to_square(data, self.settings.size))
            except Exception as e:  # noqa: BLE001 -- reported per image, the batch goes on
                images.append(None)
                errors[j] = f"cannot decode the source image: {type(e).__name__}: {e}"
        for level in sorted(set(levels)):
            rows = [j for j, lv in enumerate(levels) if lv == level and images[j] is not None]
            if not rows:
                continue
            try:
                for j, v in zip(rows, self._one_group([ids[j] for j in rows], [images[j] for j in rows], level,
                                                      [seeds[j] for j in rows])):
                    views[j] = v
                continue
            except Exception:  # noqa: BLE001 -- fall back to one image at a time, so one bad image costs only itself
                pass
            for j in rows:
                for attempt in range(self.retries + 1):
                    try:
                        views[j], errors[j] = self._one_group([ids[j]], [images[j]], level, [seeds[j]])[0], ""
                        break
                    except Exception as e:  # noqa: BLE001
                        last = traceback.format_exception_only(type(e), e)[-1].strip()
                        errors[j] = f"generation failed after {attempt + 1} attempt(s): {last}"
        n, fp = len(ids), self.fingerprint
        # bytes as an object array: never numpy's fixed-width "S" type, which drops trailing NUL bytes
        return {"id": ids, "view_index": index, "view": np.array(views, dtype=object), "noise_level": levels,
                "seed": seeds, "error": errors, "model": [fp["model"]] * n, "revision": [fp["revision"]] * n,
                "weights": [fp["weights_sha256"]] * n}

    def settings_dict(self) -> dict:
        return asdict(self.settings)
