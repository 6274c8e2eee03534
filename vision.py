"""The image side of the vision-language model: a vision tower from transformers, loaded from a local
folder, and its preprocessing, re-implemented with PIL + numpy from the folder's preprocessor_config.json.

    tower, preprocess = load_tower("data/models/clip-vit-base-patch16")
    pixels = preprocess_image(open_image("scan.png"), preprocess)        # (3, 224, 224) float32

Towers: CLIP (openai/clip-vit-base-patch16), Chinese-CLIP (OFA-Sys/chinese-clip-vit-base-patch16) and
SigLIP (google/siglip-base-patch16-224), as their own vision-only folders or as the full image-text
checkpoints the hub ships (the text half is left unread).

Preprocessing does what transformers' PIL image processors do for these three, so that an exported
LLaVA folder sees the same pixels as training did: RGB (transparency composited on white), resize
(the shortest edge to `size`, the long edge scaled and truncated, or to height x width) with PIL's
resampling filter `resample` (3 = bicubic), a centre crop (zero-padded when the image is smaller),
rescale by 1/255 (in float64, then float32) and normalise by mean and std. torchvision is not used:
it does not install beside every torch build.
"""

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

VISION_TOWERS = {  # config.json model_type -> transformers class; the image-text checkpoints hold the tower
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "chinese_clip": "ChineseCLIPVisionModel",
    "chinese_clip_vision_model": "ChineseCLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# transformers' defaults per processor class, for the keys a preprocessor_config.json leaves out
PROCESSOR_DEFAULTS = {
    "CLIPImageProcessor": dict(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ),
    "ChineseCLIPImageProcessor": dict(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ),
    "SiglipImageProcessor": dict(
        size={"height": 224, "width": 224}, do_center_crop=False, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    ),
}
COMMON_DEFAULTS = dict(
    do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True
)


class ImageError(ValueError):
    """An image file or blob that cannot be decoded; `where` names it."""

    def __init__(self, where, reason):
        super().__init__(f"{where}: cannot decode the image ({reason})")
        self.where, self.reason = where, str(reason)


# ---------------------------------------------------------------------------- the tower


def tower_class(model_type, where):
    import transformers

    name = VISION_TOWERS.get(model_type)
    if name is None:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not a vision tower this project reads "
            f"({', '.join(sorted(VISION_TOWERS))})"
        )
    return getattr(transformers, name)


def load_tower(folder):
    """(vision model in eval mode, preprocessing settings) from a local transformers folder."""
    from transformers.utils import logging

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"no vision tower at {folder} (no config.json): download one, see README 'Vision-language model'"
        )
    cls = tower_class(json.loads(config_file.read_text(encoding="utf-8")).get("model_type"), config_file)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # an image-text checkpoint's text half is reported as unexpected keys: it is unused
    try:
        tower, info = cls.from_pretrained(folder, output_loading_info=True)
    finally:
        logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"{folder}: the vision tower's weights are incomplete: missing "
            f"{sorted(info['missing_keys'])[:5]}, mismatched {sorted(info['mismatched_keys'])[:5]}"
        )
    return tower.eval(), read_preprocess(folder)


def tower_from_config(config):
    """A tower of the architecture in `config` (a vision config's to_dict()) with random weights, for a checkpoint
    to fill."""
    cls = tower_class(config.get("model_type"), "vision config")
    return cls(cls.config_class.from_dict(config)).eval()


def has_cls_token(config):
    """CLIP and Chinese-CLIP prepend a class token to the patches; SigLIP does not."""
    return not config.get("model_type", "").startswith("siglip")


def save_random_tower(
    folder, model_type="clip", hidden_size=64, layers=2, heads=4, image_size=32, patch_size=8, seed=0
):
    """A small randomly initialised tower with its preprocessor_config.json, written as transformers writes a
    downloaded one: for tests, the quickstart and benchmarks on machines without the hub."""
    import transformers

    cls = tower_class(f"{model_type}_vision_model", "save_random_tower")
    config = cls.config_class(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    torch.manual_seed(seed)
    cls(config).save_pretrained(folder)
    processor = {
        "clip": "CLIPImageProcessorPil",
        "chinese_clip": "ChineseCLIPImageProcessorPil",
        "siglip": "SiglipImageProcessorPil",
    }[model_type]  # saved without the Pil suffix
    sizes = (
        {"size": {"height": image_size, "width": image_size}}
        if model_type == "siglip"
        else {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    )
    getattr(transformers, processor)(**sizes).save_pretrained(folder)
    return Path(folder)


# ---------------------------------------------------------------------------- preprocessing


def read_preprocess(folder):
    """The tower's preprocessing as plain settings: resize, crop (h, w) or None, rescale, mean, std, resample."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a vision tower folder needs its image processor's settings")
    raw = json.loads(path.read_text(encoding="utf-8"))
    kind = raw.get("image_processor_type") or raw.get("feature_extractor_type") or ""
    kind = kind.replace("FeatureExtractor", "ImageProcessor").removesuffix("Fast").removesuffix("Pil")
    if kind not in PROCESSOR_DEFAULTS:
        raise ValueError(
            f"{path}: image processor {kind or '(unnamed)'} is not one this project re-implements "
            f"({', '.join(PROCESSOR_DEFAULTS)})"
        )
    cfg = {**COMMON_DEFAULTS, **PROCESSOR_DEFAULTS[kind], **raw}
    size = cfg["size"]
    if isinstance(size, int):  # the older single-number form: the shortest edge, as transformers reads it
        size = {"shortest_edge": size}
    if not (set(size) == {"shortest_edge"} or set(size) == {"height", "width"}):
        raise ValueError(f"{path}: size {size} is neither {{shortest_edge}} nor {{height, width}}")
    crop = cfg.get("crop_size")
    crop = [crop, crop] if isinstance(crop, int) else [crop["height"], crop["width"]] if crop else None
    return {
        "processor": kind,
        "resize": size if cfg["do_resize"] else None,
        "crop": crop if cfg["do_center_crop"] else None,
        "resample": int(cfg["resample"]),
        "rescale": float(cfg["rescale_factor"]) if cfg["do_rescale"] else None,
        "mean": list(cfg["image_mean"]) if cfg["do_normalize"] else None,
        "std": list(cfg["image_std"]) if cfg["do_normalize"] else None,
        "rgb": bool(cfg["do_convert_rgb"]),
    }


def output_size(preprocess):
    """(height, width) of every preprocessed image: the crop, else a fixed resize."""
    if preprocess["crop"]:
        return tuple(preprocess["crop"])
    resize = preprocess["resize"] or {}
    if "height" not in resize:
        raise ValueError(f"preprocessing {preprocess} gives images of varying size (no crop, no fixed resize)")
    return resize["height"], resize["width"]


def open_image(source):
    """A decoded PIL image from a path or bytes, upright per its EXIF orientation (as transformers.load_image)."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source)
        image.load()  # decode now: a truncated file fails here, not later in a batch
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        blob = isinstance(source, (bytes, bytearray, memoryview))
        raise ImageError(f"image data ({len(source)} bytes)" if blob else str(source), err) from None


def to_rgb(image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image, preprocess):
    """A PIL image -> (3, H, W) float32 array, as the tower's transformers image processor makes it."""
    if preprocess["rgb"]:
        image = to_rgb(image)
    resize = preprocess["resize"]
    if resize:
        if "shortest_edge" in resize:
            short, long = sorted(image.size)
            new_short = resize["shortest_edge"]
            new_long = int(new_short * long / short)
            width, height = (new_short, new_long) if image.width <= image.height else (new_long, new_short)
        else:
            width, height = resize["width"], resize["height"]
        image = image.resize((width, height), resample=preprocess["resample"])
    pixels = np.asarray(image)
    pixels = (pixels[..., None] if pixels.ndim == 2 else pixels).transpose(2, 0, 1)
    if preprocess["crop"]:
        pixels = center_crop(pixels, *preprocess["crop"])
    if preprocess["rescale"] is not None:
        pixels = pixels.astype(np.float64) * preprocess["rescale"]
    pixels = pixels.astype(np.float32)
    if preprocess["mean"] is not None:
        mean = np.asarray(preprocess["mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(preprocess["std"], dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return pixels


def center_crop(pixels, height, width):
    """(C, H, W) -> (C, height, width) around the centre; a smaller image is zero-padded (centred) first."""
    _, h, w = pixels.shape
    if h < height or w < width:
        padded = np.zeros((pixels.shape[0], max(h, height), max(w, width)), dtype=pixels.dtype)
        top, left = -(-(padded.shape[1] - h) // 2), -(-(padded.shape[2] - w) // 2)  # ceil: the extra row goes on top
        padded[:, top : top + h, left : left + w] = pixels
        pixels, h, w = padded, padded.shape[1], padded.shape[2]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[:, top : top + height, left : left + width]


def pixel_batch(sources, preprocess):
    """(n, 3, H, W) float32 tensor of images given as paths, bytes or PIL images; ImageError names a bad one."""
    arrays = [preprocess_image(s if isinstance(s, Image.Image) else open_image(s), preprocess) for s in sources]
    if not arrays:
        return torch.zeros(0, 3, *output_size(preprocess))
    return torch.from_numpy(np.stack(arrays))


def main():
    import argparse

    parser = argparse.ArgumentParser(description="Write a small random vision tower folder (for smoke tests).")
    parser.add_argument("--random-tower", required=True, metavar="DIR", help="the folder to write")
    parser.add_argument("--model-type", default="clip", choices=["clip", "chinese_clip", "siglip"])
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    args = parser.parse_args()
    folder = save_random_tower(
        args.random_tower,
        args.model_type,
        args.hidden_size,
        args.layers,
        image_size=args.image_size,
        patch_size=args.patch_size,
    )
    print(f"wrote {folder}: a random {args.model_type} tower, {args.image_size} px, patch {args.patch_size}")


if __name__ == "__main__":
    main()
