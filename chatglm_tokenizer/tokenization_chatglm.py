"""ChatGLM2-6B's SentencePiece tokenizer as a `transformers.PreTrainedTokenizer`.

The id layout and the fast batch path (`encode_batch`) are SentencePieceIds' (sentencepiece_ids.py,
which imports no transformers); this class adds the transformers API on top of the same ids.

This file and sentencepiece_ids.py need only sentencepiece and transformers, because
`AutoTokenizer.from_pretrained(dir, trust_remote_code=True)` copies them (a relative import is copied
along) out of the package.
"""

import os

from transformers import PreTrainedTokenizer

from .sentencepiece_ids import SentencePieceIds


class ChatGLMTokenizer(SentencePieceIds, PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        **kwargs,
    ):
        # The SentencePiece model must exist before PreTrainedTokenizer.__init__ runs, because that
        # already asks for the vocabulary. ChatGLM2's original class set it afterwards, which is what
        # breaks on current transformers ("'property' object cannot be interpreted as an integer").
        SentencePieceIds.__init__(self, vocab_file)
        # split_special_tokens=True: "<s>" typed in text is text, so the HF path and encode_batch agree.
        PreTrainedTokenizer.__init__(
            self,
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            split_special_tokens=split_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def get_vocab(self):
        vocab = {self.sp.id_to_piece(i): i for i in range(self.n_pieces)}
        vocab.update(self.special_ids)
        vocab.update(self._added_tokens_encoder)
        return vocab

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
