"""ChatGLM2-6B's SentencePiece tokenizer as a `transformers.PreTrainedTokenizer`, plus a fast batch path.

Id layout, the same for ChatGLM2's tokenizer.model and for models made by train_tokenizer.py:

    0 .. n_pieces-1        SentencePiece pieces: <unk>=0, <s>=1, </s>=2, then bytes and merges
    n_pieces .. n_pieces+4 [MASK] [gMASK] [sMASK] sop eop   (ChatGLM2: 64789 .. 64793)

Roles: bos = <s> (1) separates prompt and answer in SFT; eos = </s> (2) ends every document and every
answer; pad = <unk> (0) only fills batches (their labels are always ignored). `vocab_size` is
n_pieces + 5 (64794 for ChatGLM2): the model embeds that many rows and the largest id, 64793, fits
uint16. Nothing is added around the text by `encode`: callers append eos / insert bos themselves.

This file is self-contained (only sentencepiece and transformers) because
`AutoTokenizer.from_pretrained(dir, trust_remote_code=True)` copies it out of the package.
"""

import hashlib
import os

import sentencepiece as spm
from transformers import PreTrainedTokenizer

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                 split_special_tokens=True, clean_up_tokenization_spaces=False, **kwargs):
        # The SentencePiece model must exist before PreTrainedTokenizer.__init__ runs, because that
        # already asks for the vocabulary. ChatGLM2's original class set it afterwards, which is what
        # breaks on current transformers ("'property' object cannot be interpreted as an integer").
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self.n_pieces = self.sp.get_piece_size()
        self.special_ids = {token: self.n_pieces + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.special_tokens_by_id = {i: token for token, i in self.special_ids.items()}
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        # split_special_tokens=True: "<s>" typed in text is text, so the HF path and encode_batch agree.
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         split_special_tokens=split_special_tokens,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @property
    def vocab_size(self):
        return self.n_pieces + len(SPECIAL_TOKENS)

    @property
    def fingerprint(self):
        """sha256 of the SentencePiece model: recorded in token manifests and checkpoints."""
        return hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()

    def get_vocab(self):
        vocab = {self.sp.id_to_piece(i): i for i in range(self.n_pieces)}
        vocab.update(self.special_ids)
        vocab.update(self._added_tokens_encoder)
        return vocab

    # ---- fast path for corpus processing: SentencePiece on whole lists, multi-threaded ----
    def encode_batch(self, texts, num_threads=-1):
        """list[str] -> list[list[int]]; no special tokens added. num_threads=-1: all cores."""
        return self.sp.encode(list(texts), out_type=int, num_threads=num_threads)

    # ---- the hooks PreTrainedTokenizer needs ----
    def _tokenize(self, text, **kwargs):
        return self.sp.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        if token in self.special_ids:
            return self.special_ids[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index):
        if index in self.special_tokens_by_id:
            return self.special_tokens_by_id[index]
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        return self._decode(self.convert_tokens_to_ids(tokens))

    def _is_special_id(self, index):
        return index in self.special_tokens_by_id or self.sp.is_control(index) or self.sp.is_unknown(index)

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
        """Exact inverse of encode: runs of ordinary pieces go through SentencePiece's own decoder;
        special ids are written as their names, or dropped with skip_special_tokens."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        parts, run = [], []
        for index in token_ids:
            index = int(index)
            if not self._is_special_id(index):
                run.append(index)
                continue
            if run:
                parts.append(self.sp.decode(run))
                run = []
            if not skip_special_tokens:
                parts.append(self._convert_id_to_token(index))
        if run:
            parts.append(self.sp.decode(run))
        return "".join(parts)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 + (token_ids_1 or [])

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [int(self._is_special_id(i)) for i in token_ids_0 + (token_ids_1 or [])]
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def save_vocabulary(self, save_directory, filename_prefix=None):
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        out = os.path.join(save_directory, name)
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            with open(out, "wb") as f:
                f.write(self.sp.serialized_model_proto())
        return (out,)


# save_pretrained then writes auto_map and copies this file, so any saved folder loads with
# AutoTokenizer.from_pretrained(folder, trust_remote_code=True).
ChatGLMTokenizer.register_for_auto_class("AutoTokenizer")
