"""Word-level tokenizer of the world, built offline from `clvr.world.vocab.words()`.

Built with `tokenizers` (WordLevel model, whitespace + punctuation pre-tokenizer) and wrapped as a
transformers `PreTrainedTokenizerFast`, so it saves/loads as the usual tokenizer files beside a checkpoint.
Left padding and left truncation: the newest instruction sits at the end of the text and is never cut.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from clvr.world.vocab import words

PAD, UNK = "[PAD]", "[UNK]"


def build_tokenizer(max_len: int = 64) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([PAD, UNK, *words()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, model_max_length=max_len,
                                   padding_side="left", truncation_side="left")
