"""The built-in byte-level tokenizer: a ``transformers`` fast tokenizer made in code, no files.

Every UTF-8 string round-trips: the vocabulary is the 256 byte symbols of GPT-2's byte-level
alphabet (no merges, so one token per byte) plus a few special tokens. It is what the default job
and the tests use; real runs load the model's own tokenizer instead.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_byte_tokenizer", "load_tokenizer", "SPECIAL_TOKENS", "CHAT_TEMPLATE"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Renders {"role", "content"} messages (an assistant's tool calls as JSON after its content); the
# assistant turn ends with eos, which the model learns.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' }}{{ m['content'] }}"
    "{% if m.get('tool_calls') %}{{ m['tool_calls'] | tojson }}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_byte_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast`` with ``<pad> <s> </s> <unk>`` and role tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + ROLE_TOKENS
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    # add_special_tokens=True prepends <s>, like LLaMA tokenizers do.
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        additional_special_tokens=ROLE_TOKENS,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
        **SPECIAL_TOKENS,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str | Path | None, *, trust_remote_code: bool = False):
    """The tokenizer saved in a local directory, or the built-in byte tokenizer when ``path`` is None.

    A tokenizer without a pad token gets its eos token as pad (common for LLaMA tokenizers).
    """
    if path is None:
        return build_byte_tokenizer()
    from transformers import AutoTokenizer

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(root)!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(root, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:  # transformers' "cannot find / instantiate" errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(
            f"no usable tokenizer in {str(root)!r} ({first}): it needs the files written by "
            "tokenizer.save_pretrained (tokenizer.json, tokenizer_config.json); or set model.tokenizer"
        ) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"the tokenizer in {str(root)!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok
