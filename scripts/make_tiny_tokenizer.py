"""Regenerate the tiny committed tokenizer (``tiny_tokenizer.model`` and ``tiny_tokenizer.json``).

Why this exists: the tiny LLaVA fixture needs a Llama-style tokenizer that every (torch, transformers)
cell reads identically. Training it at test time would tie the ids to the installed sentencepiece
version, so it is trained once, committed, and this script is kept only so the files can be
regenerated and reviewed.

How the two files are made:

* ``tiny_tokenizer.model``: ``sentencepiece`` BPE, vocab 512, trained on ``CORPUS`` below with
  Llama-1/2 style options (byte fallback, digits split, identity normalisation, no whitespace
  collapsing, a dummy prefix, ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad id), single-threaded.
  Unlike Llama, whitespace-only pieces are not allowed, so splitting on ``▁`` before BPE (which old
  ``tokenizers`` releases always do) cannot change the result.
* ``tiny_tokenizer.json``: the fast-tokenizer file, written by hand from the trained model's pieces
  (no transformers converter involved): a BPE model with the same vocab and merges derived from the
  piece scores, no normaliser, a ``Metaspace`` pre-tokenizer with ``prepend_scheme="first"`` (the
  non-legacy Llama behaviour: ``legacy: false``), a ``<s> $A`` post-processor and the usual Llama
  decoder. The JSON carries both the old (``add_prefix_space``) and new (``split``) Metaspace
  fields, so ``tokenizers`` 0.15 and 0.2x both read it.

The script then checks that the fast file reproduces sentencepiece's ids on a set of probe strings
(including ones after a special token, the way ``<image>`` splits a LLaVA prompt).

Run (needs ``sentencepiece`` and ``tokenizers``)::

    python scripts/make_tiny_tokenizer.py            # writes into dymu/data/
    python scripts/make_tiny_tokenizer.py --check    # only verify the committed files
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "dymu" / "data"  # where the files ship
MODEL_PATH = HERE / "tiny_tokenizer.model"
JSON_PATH = HERE / "tiny_tokenizer.json"
VOCAB_SIZE = 512
SPACE = "\u2581"

CORPUS = """\
A chat between a curious human and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is in the picture? ASSISTANT: The picture shows a red square on a blue background.
USER: Describe the image in detail. ASSISTANT: There is a green field under a bright yellow sun.
USER: How many objects are there? ASSISTANT: There are three objects: a circle, a square and a line.
USER: What color is the sky? ASSISTANT: The sky is blue with a few white clouds.
USER: Is there a person in the image? ASSISTANT: No, there is no person in the image.
USER: What is the man holding? ASSISTANT: The man is holding a small black umbrella.
USER: Where is the cat sitting? ASSISTANT: The cat is sitting on a wooden table near the window.
USER: Answer the question using a single word or phrase. ASSISTANT: Yes.
USER: What time of day is it? ASSISTANT: It looks like early morning, the light is soft and warm.
USER: Read the text on the sign. ASSISTANT: The sign says stop.
The quick brown fox jumps over the lazy dog.
A large flat region of one color is easy to compress, while a noisy texture is not.
Images are split into patches of fourteen by fourteen pixels, and each patch becomes a token.
Similar tokens can be merged, so a simple image needs fewer tokens than a busy one.
The model reads the image tokens and the text tokens, then writes an answer one token at a time.
There is a dog running on the beach next to the water, and the waves are white.
Two children are playing with a ball in the park, while their parents watch from a bench.
The kitchen has a white stove, a silver sink, and a bowl of green apples on the counter.
A bus is driving down a busy street in the city, with tall buildings on both sides.
A plate of food with rice, vegetables and a piece of grilled fish.
The train is stopped at the station, and people are waiting on the platform.
An old house with a red roof stands at the end of a narrow road.
Please describe the scene, count the objects, and say what colors you see.
The numbers one, two, three, four, five, six, seven, eight, nine and ten.
In 2023, the model was trained on 558 thousand images and 665 thousand conversations.
The answer is 42, and the image is 336 by 336 pixels.
Left, right, top, bottom, center, corner, edge, border, stripe, grid, dot, noise.
Black, white, red, green, blue, yellow, orange, purple, pink, brown, gray.
She said: "This is a photo of a mountain lake at sunset."
What is the difference between the two pictures? The second one is darker.
Is this a cat or a dog? It is a cat with orange fur and green eyes.
The weather is sunny and warm, with a light wind from the west.
A man in a blue shirt is riding a bicycle along the river.
The table is covered with books, papers, a laptop, and a cup of coffee.
Where was this photo taken? It was taken in a small town in the mountains.
Why is the road wet? Because it has been raining for most of the day.
Can you see any animals? Yes, there are two birds on the fence and a horse in the field.
"""

# Strings whose ids the fast file must reproduce exactly (the first one is the prompt used by tests).
PROBES = [
    "USER: What is in the picture? ASSISTANT:",
    "\nWhat is in the picture? ASSISTANT:",
    "A chat between a curious human and an artificial intelligence assistant.",
    "numbers 12345 and 3.14, unseen words: zebra quixotic",
    "two  spaces,   three spaces, trailing space ",
    "non-ASCII: café, naïve, 東京, emoji 🙂",
    "tabs\tand\nnewlines\n\n",
]
# Not probed: a string that starts with a space. ``Metaspace`` does not prepend a second "▁" to it
# while sentencepiece's dummy prefix does; this is the same known difference every converted Llama
# fast tokenizer has, and LLaVA prompts never start with a space.


def train_model() -> bytes:
    """Train the sentencepiece BPE model and return its serialized bytes."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def _pieces(model_bytes: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) for every id; type follows sentencepiece (1 normal, 2 unk, 3 control, 6 byte)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    out = []
    for i in range(sp.GetPieceSize()):
        kind = 1
        if sp.IsUnknown(i):
            kind = 2
        elif sp.IsControl(i):
            kind = 3
        elif sp.IsByte(i):
            kind = 6
        out.append((sp.IdToPiece(i), sp.GetScore(i), kind))
    return out


def build_tokenizer_json(model_bytes: bytes) -> dict:
    """The fast-tokenizer description equivalent to the sentencepiece model (see module docstring)."""
    pieces = _pieces(model_bytes)
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    # Merges: every way to split a normal multi-character piece into two pieces of the vocab, ranked
    # by the score of the merged piece (higher score merges first, as in sentencepiece BPE).
    merges: list[tuple[int, int, int, str, str]] = []
    for i, (piece, _score, kind) in enumerate(pieces):
        if kind != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((i, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-pieces[m[0]][1], m[0], m[1], m[2]))
    specials = [(i, p) for i, (p, _, kind) in enumerate(pieces) if kind in (2, 3)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": p,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, p in specials
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Metaspace",
            "replacement": SPACE,
            "add_prefix_space": True,
            "prepend_scheme": "first",
            "split": False,
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [vocab["<s>"]], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": vocab,
            "merges": [f"{left} {right}" for _, _, _, left, right in merges],
        },
    }


def dumps_tokenizer_json(data: dict) -> str:
    """Stable serialisation (so regenerating gives the same bytes)."""
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def check(model_bytes: bytes, tokenizer_json: str) -> None:
    """Fail loudly if the fast file does not reproduce sentencepiece's ids on the probes."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_bytes)
    assert sp.GetPieceSize() == VOCAB_SIZE, sp.GetPieceSize()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    fast = Tokenizer.from_str(tokenizer_json)
    for text in PROBES + CORPUS.splitlines():
        want = [sp.bos_id(), *sp.EncodeAsIds(text)]
        got = fast.encode(text).ids
        assert got == want, (text, got, want)
        assert fast.decode(got) == text, (text, fast.decode(got))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="verify the committed files, write nothing")
    args = parser.parse_args()
    if args.check:
        check(MODEL_PATH.read_bytes(), JSON_PATH.read_text(encoding="utf-8"))
        print("ok: committed tokenizer files agree")
        return
    model_bytes = train_model()
    tokenizer_json = dumps_tokenizer_json(build_tokenizer_json(model_bytes))
    check(model_bytes, tokenizer_json)
    MODEL_PATH.write_bytes(model_bytes)
    JSON_PATH.write_text(tokenizer_json, encoding="utf-8")
    print(f"wrote {MODEL_PATH} and {JSON_PATH}")


if __name__ == "__main__":
    main()
