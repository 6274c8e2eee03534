"""Vision-language training data: corpora.py's image conversations, rendered with the SFT template
(dataset_sft.render) and served by SFTData's deterministic batching as (X, Y, {"images": pixels}).

Every "<image>" in a prompt becomes image_tokens copies of the image id. Those positions are inputs only,
never targets: the model puts the image's projected features there. Labels are SFT's (answers and their
<eos>). With image_tokens 2, image id I, prompt "<image>\\n是什么？" = [I, I, p1, p2] and answer [a1]:

    ids     I     I     p1    p2    <bos>  a1    <eos>
    inputs  I     I     p1    p2    <bos>  a1
    labels  -100  -100  -100  -100  a1     <eos>

plain_prompts=True (the align stage: LLaVA's "plain" template) keeps only a prompt's images and drops its
text, so a caption is learnt from the image alone; a conversation without images is then dropped (counted).

A conversation longer than max_seq_len loses its earliest turns (with their images), then the start of its
last prompt, as in SFT; a cut through an image, or an answer that cannot fit, drops it (counted). Images
are decoded and preprocessed when their batch is built (in the trainer's prefetch thread); one that cannot
be decoded leaves its row out of the loss (all labels -100), counted and reported with its file.
"""

import itertools
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from corpora import IMAGE_PLACEHOLDER, Problems, iter_image_dialogues
from dataset_sft import SFTData, fit_turns, render, rows_sha256
from lm_head import IGNORE_INDEX
from vision import ImageError, open_image, output_size, preprocess_image
from vlm import encode_texts, images_kept


class VLMData(SFTData):
    """Image conversations of several corpora.Sources, tokenized once; images kept as paths or bytes."""

    def __init__(
        self,
        sources,
        tokenizer,
        seq_len,
        image_tokens,
        image_token_id,
        preprocess,
        seed=1337,
        val_fraction=0.02,
        plain_prompts=False,
        pack=False,
        image_folders=None,
        encode_batch=1024,
    ):
        self.seq_len, self.seed, self.pack = seq_len, seed, pack
        self.pad_id = tokenizer.pad_id
        self.preprocess = preprocess
        self.dropped = Counter()
        self.problems = Problems()
        self.undecodable = set()
        tokens, masks, names, self.images, self.origins = [], [], [], [], []
        for source in sources:
            items = iter_image_dialogues(source, self.problems, (image_folders or {}).get(source.name))
            bar = tqdm(desc=f"tokenize {source.name}", unit=" conv", leave=False)
            while chunk := list(itertools.islice(items, encode_batch)):
                bar.update(len(chunk))
                texts = [
                    IMAGE_PLACEHOLDER * prompt.count(IMAGE_PLACEHOLDER) if plain_prompts else prompt
                    for item in chunk
                    for prompt, _ in item.turns
                ]
                answers = [answer for item in chunk for _, answer in item.turns]
                encoded = iter(
                    zip(encode_texts(tokenizer, texts, image_tokens, image_token_id), tokenizer.encode_batch(answers))
                )
                for item in chunk:
                    if plain_prompts and not item.images:  # nothing left to learn from: no image, no prompt text
                        self.dropped["no image, and plain prompts keep only images"] += 1
                        for _ in item.turns:
                            next(encoded)
                        continue
                    fitted = fit_turns([next(encoded) for _ in item.turns], seq_len + 1)
                    if fitted is None:
                        self.dropped["answer longer than max_seq_len"] += 1
                        continue
                    ids, is_answer = render(fitted, tokenizer.bos_id, tokenizer.eos_id)
                    kept = images_kept(ids, image_token_id, image_tokens)
                    if kept is None:
                        self.dropped["an image cut by max_seq_len"] += 1
                        continue
                    tokens.append(np.asarray(ids, dtype=np.uint16))
                    masks.append(np.asarray(is_answer, dtype=bool))
                    names.append(source.name)
                    self.images.append(
                        [
                            str(image) if not isinstance(image, bytes) else image
                            for image in item.images[len(item.images) - kept :]
                        ]
                    )
                    self.origins.append(item.origin)
            bar.close()
        if not tokens:
            raise ValueError(
                f"no usable image conversation in {', '.join(s.name for s in sources)} "
                f"({dict(self.dropped)}; {self.problems.summary()})"
            )
        self.store(tokens, masks, names, val_fraction)
        self.fingerprint = rows_sha256(self.fingerprint, self.images)

    def describe(self):
        images = sum(len(refs) for refs in self.images)
        skipped = f"; readers skipped {self.problems.total}" if self.problems.total else ""
        return f"{super().describe()}, {images} images{skipped}"

    def pixels(self, refs):
        return [preprocess_image(open_image(ref), self.preprocess) for ref in refs]

    def to_batch(self, rows):
        """Rows of sample ids -> (X, Y, {"images": (n, 3, H, W)}), the images in the order of their positions."""
        X, Y = super().to_batch(rows)
        pixels = []
        for r, samples in enumerate(rows):
            for i in samples:
                try:
                    pixels += self.pixels(self.images[i])
                except ImageError as err:
                    Y[r] = IGNORE_INDEX  # the row still runs (its image positions need rows) but adds no loss
                    pixels += [np.zeros((3, *output_size(self.preprocess)), dtype=np.float32)] * len(self.images[i])
                    self.report(err, self.origins[i])
        images = torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros(0, 3, *output_size(self.preprocess))
        return X, Y, {"images": images}

    def report(self, err, origin):
        """Count a record with an undecodable image once (its rows are left out whenever they come up); say so."""
        if origin not in self.undecodable:
            self.undecodable.add(origin)
            self.problems.add("image cannot be decoded: its rows are left out of the loss", *origin, str(err))
            tqdm.write(f"warning: {origin[0]}:{origin[1]}: {err}; its rows are left out of the loss")
