"""A vision-language model on our LLM, LLaVA-1.5 style: vision tower -> MLP projector -> image tokens
spliced into the LLM's input where the prompt says <image>.

    image -> vision tower (frozen) -> hidden states of layer feature_layer (-2), CLS dropped
          -> [k x k average pooling] -> Linear -> GELU -> Linear -> (image_tokens, dim)
    "<image>\\n这张片子显示什么？" -> ids with image_tokens copies of the image id -> those positions take
          the image rows instead of token embeddings -> the Transformer of model.py, unchanged

Why this design. It is the smallest one shown to work well: LLaVA-1.5 reaches the quality of models
built on a Q-Former (BLIP-2, MiniGPT-4, InstructBLIP) or a cross-attention resampler (Qwen-VL) with a
two-layer MLP and far less data, and minimind-v shows the same recipe on a 26M-parameter LLM. It adds
one small module and no new attention: the LLM stays model.py's Transformer (its KV cache, chunked
loss, export and training loop all apply), and the whole model exports as transformers'
LlavaForConditionalGeneration. CogVLM's visual experts double the LLM's weights; a resampler or a
Q-Former is a second transformer to train. The second-to-last layer and no CLS token are LLaVA's
choice (the last layer is specialised for CLIP's contrastive objective); SigLIP has no CLS token, so
it keeps every token. Pooling (projector_pool=2: 196 -> 49 tokens for a 224 px ViT-B/16) trades
detail for a 4x shorter image, which matters for a 512-token context.

Training has two stages (vlm_train.py): `align` trains the projector only, on captions (LLM and tower
frozen); `instruct` trains projector and LLM on visual instructions, the loss on answers only
(dataset_sft.render's template). The tower stays frozen in both.

The image placeholder id is the tokenizer's `[MASK]` (64789 in ChatGLM2's, n_pieces in one made by
train_tokenizer.py): a special id nothing else in this project uses, and one no text can produce
(typed "[MASK]" or "<image>" encodes as ordinary pieces), so image positions cannot be forged by
a prompt.
"""

from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import CheckpointError, check_finite, checkpoint_meta, load_checkpoint
from corpora import IMAGE_PLACEHOLDER
from model import ModelArgs, Transformer
from vision import has_cls_token, load_tower, tower_from_config

IMAGE_TOKEN = "[MASK]"  # the special token whose id stands for image positions
STAGES = {"align": ("projector",), "instruct": ("projector", "llm")}  # what each stage trains


@dataclass
class VLMArgs(ModelArgs):
    """The LLM's arguments plus the image side; stored in checkpoints, so a VLM checkpoint is self-contained."""

    vision: dict = field(default_factory=dict)  # the tower's transformers config (to_dict())
    preprocess: dict = field(default_factory=dict)  # vision.read_preprocess settings
    feature_layer: int = -2  # hidden states of this tower layer feed the projector
    feature_select: str = "default"  # "default": drop the CLS token; "full": every token (SigLIP)
    projector_pool: int = 1  # k x k average pooling of the patch grid before the projector
    image_token_id: int = 64789

    @property
    def image_tokens(self):
        """LLM positions one image takes."""
        grid = self.vision["image_size"] // self.vision["patch_size"]
        extra = 1 if self.feature_select == "full" and has_cls_token(self.vision) else 0
        return (grid // self.projector_pool) ** 2 + extra


def llm_args(args: VLMArgs) -> ModelArgs:
    return ModelArgs(**{f.name: getattr(args, f.name) for f in fields(ModelArgs)})


def check_args(args: VLMArgs):
    grid = args.vision["image_size"] // args.vision["patch_size"]
    if args.feature_select not in ("default", "full"):
        raise ValueError(f"feature_select must be 'default' (drop CLS) or 'full', not {args.feature_select!r}")
    if args.feature_select == "default" and not has_cls_token(args.vision):
        raise ValueError(f"{args.vision['model_type']} has no CLS token to drop: use feature_select='full'")
    if args.projector_pool < 1 or grid % args.projector_pool:
        raise ValueError(f"projector_pool {args.projector_pool} must divide the {grid}x{grid} patch grid")
    if args.projector_pool > 1 and args.feature_select == "full" and has_cls_token(args.vision):
        raise ValueError("pooling needs the patch grid alone: use feature_select='default' (drop CLS)")


class Projector(nn.Module):
    """LLaVA-1.5's projector (Linear, GELU, Linear), after optional k x k average pooling of the patch grid.
    Module names match transformers' LlavaMultiModalProjector, so export_hf.py copies it as it is."""

    def __init__(self, vision_dim, dim, pool=1):
        super().__init__()
        self.pool = pool
        self.linear_1 = nn.Linear(vision_dim, dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features):  # (n, tokens, vision_dim) -> (n, tokens / pool^2, dim)
        if self.pool > 1:
            n, tokens, channels = features.shape
            grid = int(tokens**0.5)
            square = features.transpose(1, 2).reshape(n, channels, grid, grid)
            features = F.avg_pool2d(square, self.pool).flatten(2).transpose(1, 2)
        return self.linear_2(self.act(self.linear_1(features)))


class VLM(nn.Module):
    """Called as the trainer calls any model: model(x, y, reduction="sum", images=pixels), pixels being the
    batch's images (n, 3, H, W) in the order their placeholders appear (row by row)."""

    def __init__(self, args: VLMArgs, tower=None):
        super().__init__()
        check_args(args)
        self.args = args
        self.llm = Transformer(llm_args(args))
        self.vision = tower if tower is not None else tower_from_config(args.vision)
        self.projector = Projector(args.vision["hidden_size"], args.dim, args.projector_pool)

    @property
    def layers(self):  # the blocks FSDP shards one by one
        return self.llm.layers

    @property
    def rope_cos(self):  # inference.py finds the model's device through it
        return self.llm.rope_cos

    def image_features(self, images):
        """(n, 3, H, W) pixels -> (n, image_tokens, dim) LLM input embeddings."""
        tower_dtype = next(self.vision.parameters()).dtype
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):  # a frozen tower keeps no activations
            hidden = self.vision(pixel_values=images.to(tower_dtype), output_hidden_states=True).hidden_states
        features = hidden[self.args.feature_layer]
        if self.args.feature_select == "default":
            features = features[:, 1:]
        return self.projector(features)

    def has_images(self, found, images):
        """Whether there are images; their rows must fill the `found` image positions exactly."""
        expected = 0 if images is None else len(images) * self.args.image_tokens
        if found != expected:
            raise ValueError(
                f"{found} image positions in the tokens but {0 if images is None else len(images)} "
                f"image(s) x {self.args.image_tokens} tokens = {expected}"
            )
        return expected > 0

    def forward(self, tokens, targets=None, reduction="mean", images=None):
        """As Transformer.forward, with the images' rows in place of the image token positions."""
        where = tokens == self.args.image_token_id
        embeds = None
        if self.has_images(int(where.sum()), images):
            embeds = (where, self.image_features(images).flatten(0, 1))
        out = self.llm(tokens, targets, reduction, embeds=embeds)
        if embeds is None and targets is not None and torch.is_grad_enabled():
            # DDP reduces every trained weight's gradient on every rank together: a batch without images must reach
            # the projector too (with a zero), or the ranks' reductions would differ (an error, or a hang)
            out = out + 0.0 * sum(p.sum() for p in self.projector.parameters())
        return out

    def _embeds_for(self, prompts, images):
        found = sum(list(p).count(self.args.image_token_id) for p in prompts)
        if not self.has_images(found, images):
            return None
        with torch.no_grad():
            return self.args.image_token_id, self.image_features(images.to(self.rope_cos.device)).flatten(0, 1)

    def stream(self, prompts, max_new_tokens, images=None, **sampling):
        """Transformer.stream with images (their placeholders already expanded in the prompts)."""
        return self.llm.stream(prompts, max_new_tokens, embeds_for=self._embeds_for(prompts, images), **sampling)

    def generate(self, prompts, max_new_tokens, eos_id=None, images=None, **sampling):
        return self.llm.generate(
            prompts, max_new_tokens, eos_id=eos_id, embeds_for=self._embeds_for(prompts, images), **sampling
        )

    def compile_for_training(self):
        self.llm.compile_for_training()

    def num_params(self, non_embedding=False):
        embedding = self.llm.tok_embeddings.weight.numel() if non_embedding else 0
        return sum(p.numel() for p in self.parameters()) - embedding

    def flops_per_token(self, seq_len):
        """The LLM's training FLOPs per token, plus the projector's (forward and backward) and the frozen
        tower's (forward only) for one image per seq_len-token row, spread over its tokens."""
        a = self.args
        patches = (a.vision["image_size"] // a.vision["patch_size"]) ** 2 + int(has_cls_token(a.vision))
        tower = 2 * sum(p.numel() for p in self.vision.parameters()) * patches
        projector = 6 * sum(p.numel() for p in self.projector.parameters()) * a.image_tokens
        return self.llm.flops_per_token(seq_len) + (tower + projector) / seq_len


def set_trainable(model: VLM, stage):
    """Freeze what `stage` does not train: frozen weights get no gradients and no optimizer state."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    for name in ("vision", "llm", "projector"):
        getattr(model, name).requires_grad_(name in STAGES[stage])
    model.vision.eval()  # no dropout in a frozen tower, whatever mode the trainer sets


def image_token_id(tokenizer):
    return tokenizer.special_ids[IMAGE_TOKEN]


def encode_texts(tokenizer, texts, image_tokens, image_id):
    """Token ids of each text, every "<image>" in it becoming image_tokens copies of image_id. The pieces
    between placeholders are encoded separately, as transformers' tokenizers do around an added token."""
    parts = [text.split(IMAGE_PLACEHOLDER) for text in texts]
    encoded = iter(tokenizer.encode_batch([piece for pieces in parts for piece in pieces]))
    out = []
    for pieces in parts:
        ids = list(next(encoded))
        for _ in pieces[1:]:
            ids += [image_id] * image_tokens + list(next(encoded))
        out.append(ids)
    return out


def images_kept(ids, image_id, image_tokens):
    """How many whole images `ids` holds; None when a cut at the start left part of one."""
    count = sum(1 for token in ids if token == image_id)
    return None if count % image_tokens else count // image_tokens


def is_vlm_checkpoint(ckpt):
    return "vision" in ckpt.get("model_args", {})


def is_vlm_file(path):
    """Whether a checkpoint file holds a VLM, from its arguments (memory-mapped: no weights are read).
    A missing, unreadable or foreign file is not one: the text loader then reports it."""
    try:
        return is_vlm_checkpoint(checkpoint_meta(path))
    except CheckpointError:
        return False


def build_vlm(
    llm_checkpoint, tower_folder, tokenizer, feature_layer=-2, feature_select="", projector_pool=1, dropout=0.0
):
    """A fresh VLM for the align stage: the LLM from a text checkpoint, the tower from a local folder,
    a new projector (initialised from torch's current RNG)."""
    ckpt = load_checkpoint(llm_checkpoint)
    if is_vlm_checkpoint(ckpt):
        raise ValueError(
            f"{llm_checkpoint} is a vision-language checkpoint: the align stage starts from a text "
            "checkpoint (pretrain or SFT); instruct starts from the align checkpoint"
        )
    if ckpt.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise ValueError(f"{llm_checkpoint} was trained with another tokenizer than the one given")
    tower, preprocess = load_tower(tower_folder)
    vision = tower.config.to_dict()
    select = feature_select or ("default" if has_cls_token(vision) else "full")
    args = VLMArgs(
        **{**ckpt["model_args"], "dropout": dropout},
        vision=vision,
        preprocess=preprocess,
        feature_layer=feature_layer,
        feature_select=select,
        projector_pool=projector_pool,
        image_token_id=image_token_id(tokenizer),
    )
    model = VLM(args, tower)
    model.llm.load_state_dict(ckpt["model"], strict=True)
    return model


def load_vlm(path, device="cpu", tokenizer=None):
    """(VLM in eval mode, checkpoint dict) from a vlm_train.py checkpoint; checks as checkpoint.load_model."""
    ckpt = load_checkpoint(path)
    if not is_vlm_checkpoint(ckpt):
        raise ValueError(f"{path} is a text checkpoint, not a vision-language one")
    if tokenizer is not None and ckpt.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint):
        raise ValueError(f"{path} was trained with a different tokenizer: pass the tokenizer it was trained with")
    model = VLM(VLMArgs(**ckpt["model_args"]))
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the model arguments stored with them:\n{err}") from None
    check_finite(model, path)
    return model.to(device).eval(), ckpt
