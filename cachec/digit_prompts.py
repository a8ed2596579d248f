"""The prompt language of ``digits-mmdit``: a digit's class plus optional thickness and slant words.

Grammar (every word is one token of the word-level tokenizer, :func:`make_tokenizer`)::

    prompt   := class | "a" attrs class
    attrs    := thickness | slant | thickness slant | slant thickness
    class    := "zero" | "one" | ... | "nine"
    thickness:= "thin" | "medium" | "thick"          (bins of cachec.attributes)
    slant    := "left-leaning" | "upright" | "right-leaning"   

The empty prompt ``""`` is the unconditional branch of classifier-free guidance. :func:`parse` reads a
prompt back into ``(class, thickness bin or None, slant bin or None)``, which is what prompt adherence is
scored against (:mod:`cachec.attributes`).

Shipped prompt sets (:func:`prompt_set`): ``calibration`` and ``held-out`` are disjoint sets of 30
fully specified prompts (class × thickness × slant triples split by ``(class + thickness + slant) mod 3``
= 1 and 0), each class three times.
"""

from __future__ import annotations

import random
from pathlib import Path

#: words of the thickness / slant bins 0, 1, 2 (:mod:`cachec.attributes` measures them)
THICKNESS = ("thin", "medium", "thick")
SLANT = ("left-leaning", "upright", "right-leaning")
CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPECIAL = ("[PAD]", "[BOS]", "[UNK]", "[EOS]")  # EOS != 2: CLIPTextModel pools at the first EOS
VOCAB = SPECIAL + ("a",) + CLASS_WORDS + THICKNESS + SLANT
MAX_TOKENS = 8  # [BOS] a thickness slant class [EOS] = 6, padded to 8
PROMPT_SETS = ("calibration", "held-out")


def compose(digit: int, thick: int | None = None, slant: int | None = None, slant_first: bool = False) -> str:
    """The prompt for a class and optional attribute bins (0..2)."""
    words = []
    if thick is not None:
        words.append(THICKNESS[thick])
    if slant is not None:
        words.insert(0, SLANT[slant]) if slant_first else words.append(SLANT[slant])
    return " ".join((["a"] + words if words else []) + [CLASS_WORDS[digit]])


def parse(prompt: str) -> tuple[int, int | None, int | None]:
    """``(class, thickness bin or None, slant bin or None)`` of a prompt of this grammar.

    Raises:
        ValueError: the prompt is not in the grammar (the message names the first unknown word).
    """
    words = prompt.split()
    if not words or words[-1] not in CLASS_WORDS:
        raise ValueError(f"prompt {prompt!r} must end with a digit word ({', '.join(CLASS_WORDS)})")
    digit, thick, slant = CLASS_WORDS.index(words[-1]), None, None
    body = words[:-1]
    if body and body[0] == "a" and len(body) > 1:
        body = body[1:]
    elif body == ["a"]:
        raise ValueError(f"prompt {prompt!r}: 'a' must be followed by an attribute")
    elif body:
        raise ValueError(f"prompt {prompt!r}: attributes follow 'a' (e.g. 'a thick upright seven')")
    for w in body:
        if w in THICKNESS and thick is None:
            thick = THICKNESS.index(w)
        elif w in SLANT and slant is None:
            slant = SLANT.index(w)
        else:
            raise ValueError(f"prompt {prompt!r}: unexpected word {w!r}; attributes are {THICKNESS + SLANT}")
    return digit, thick, slant


def random_prompt(digit: int, thick: int, slant: int, rng: random.Random, p_drop: float = 0.25) -> str:
    """A training prompt for a digit whose measured bins are ``thick``/``slant``: each attribute is
    dropped with probability ``p_drop``; attribute order is random."""
    t = None if rng.random() < p_drop else thick
    s = None if rng.random() < p_drop else slant
    return compose(digit, t, s, slant_first=rng.random() < 0.5)


def prompt_set(name: str) -> list[str]:
    """A shipped prompt set, ``"calibration"`` or ``"held-out"`` (30 prompts each, disjoint).

    Raises:
        ValueError: unknown name.
    """
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; shipped: {', '.join(PROMPT_SETS)}")
    want = 1 if name == "calibration" else 0
    return [compose(d, t, s) for d in range(10) for t in range(3) for s in range(3) if (d + t + s) % 3 == want]


def write_prompt_set(name: str, path: str | Path) -> Path:
    """Write a shipped prompt set as a prompts file (one prompt per line) for ``--prompts FILE``."""
    path = Path(path)
    path.write_text("\n".join(prompt_set(name)) + "\n")
    return path


def make_tokenizer():
    """The word-level tokenizer of the grammar (a ``transformers.PreTrainedTokenizerFast``): whitespace
    split, ``[BOS] … [EOS]``, padded to :data:`MAX_TOKENS` with ``[PAD]``; unknown words → ``[UNK]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]", pad_token="[PAD]",
        model_max_length=MAX_TOKENS)
