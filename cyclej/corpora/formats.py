"""The exact training examples of every stage, as token ids with loss masks, and how they are batched.

Layouts (``{DA}``/``{DB}``: the domains' marker tokens; ``|`` separates prompt from target; the loss is
taken on the target only, which always ends with EOS)::

    para_train  (2A)  {Dsrc} text {Dtgt} | para EOS        and   {Dtgt} para {Dsrc} | text EOS
    domain_train(2B)  {DX} | text EOS
    rl / translate    {DX} src {DY}                         (a prompt; the policy writes the rest)

Each text is tokenized on its own, without special tokens, and with special-token strings inside the
text split as plain text: a corpus line that happens to contain "<|endoftext|>" or a marker's spelling
can never produce those ids. Marker ids come from the tokenizer (cyclej.models.loading adds the markers as
special tokens).

Batching. `pack` puts several short examples into one sequence of at most `seq_len` tokens with
position ids restarting at 0 per example, and `collate` builds a 4D block-diagonal causal mask
([B, 1, L, L], 0 where attention is allowed, -inf elsewhere) so packed examples never attend to each
other: a packed example's logits equal its logits alone. Model families that do not take a 4D mask
(`supports_packing(model)` is False) get `bucket` instead: one example per row, rows of similar length
batched together so little is padded, and a plain 2D padding mask.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch

from cyclej.errors import BadInput

if TYPE_CHECKING:
    from transformers import PreTrainedModel

IGNORE_INDEX = -100  # label of a token the loss skips (PyTorch cross-entropy's ignore_index)


@dataclass(frozen=True)
class Example:
    """One training example: `labels[i]` is `input_ids[i]` on target tokens and IGNORE_INDEX on the prompt
    (the model shifts labels by one inside its loss, as Hugging Face causal LMs do)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids has {len(self.input_ids)} tokens but labels has {len(self.labels)}")

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PackedSequence:
    """Examples laid end to end in one row. `lengths` are theirs, in order; `truncated` counts the ones
    cut to fit `seq_len`."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    lengths: list[int]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


# ---- examples -------------------------------------------------------------------------------------
def encode_text(tokenizer: Any, text: str) -> list[int]:
    """A text's token ids: no BOS/EOS added, special-token spellings inside the text kept as plain text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """`encode_text` for many texts in one tokenizer call (much faster with a fast tokenizer)."""
    if not texts:
        return []
    return [
        list(ids)
        for ids in tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ]


def eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise BadInput(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')}: it has no EOS token; targets end with EOS"
        )
    return int(eos)


def prompt_target_example(prompt: list[int], target: list[int]) -> Example:
    """Prompt then target; the loss is on the target only."""
    return Example(list(prompt) + list(target), [IGNORE_INDEX] * len(prompt) + list(target))


def para_examples(
    tokenizer: Any, marker_src_id: int, marker_tgt_id: int, text: str, para: str
) -> list[Example]:
    """Stage 2A, both directions for one (text, paraphrase) pair of the source domain:
    ``{Dsrc} text {Dtgt}`` → para EOS, and ``{Dtgt} para {Dsrc}`` → text EOS."""
    text_ids, para_ids, eos = encode_text(tokenizer, text), encode_text(tokenizer, para), eos_id(tokenizer)
    return [
        prompt_target_example([marker_src_id, *text_ids, marker_tgt_id], [*para_ids, eos]),
        prompt_target_example([marker_tgt_id, *para_ids, marker_src_id], [*text_ids, eos]),
    ]


def translation_example(
    tokenizer: Any, marker_src_id: int, source: str, marker_tgt_id: int, target: str
) -> Example:
    """One direction only: ``{Dsrc} source {Dtgt}`` → target EOS (the translation prompt, `rl_prompt`),
    for pairs whose source is synthetic and whose target is real (back-translation)."""
    return prompt_target_example(
        rl_prompt(tokenizer, marker_src_id, source, marker_tgt_id),
        [*encode_text(tokenizer, target), eos_id(tokenizer)],
    )


def domain_example(tokenizer: Any, marker_id: int, text: str) -> Example:
    """Stage 2B: ``{DX}`` → text EOS (the domain language model)."""
    return prompt_target_example([marker_id], [*encode_text(tokenizer, text), eos_id(tokenizer)])


def domain_examples(tokenizer: Any, marker_id: int, texts: Sequence[str]) -> list[Example]:
    """`domain_example` for many texts, tokenized in one batch."""
    eos = eos_id(tokenizer)
    return [prompt_target_example([marker_id], [*ids, eos]) for ids in encode_texts(tokenizer, texts)]


def rl_prompt(tokenizer: Any, marker_src_id: int, text: str, marker_tgt_id: int) -> list[int]:
    """RL and translation: ``{DX} src {DY}``; the model continues with the text in domain Y and EOS."""
    return [marker_src_id, *encode_text(tokenizer, text), marker_tgt_id]


# ---- truncation and packing ---------------------------------------------------------------------
def truncate(example: Example, seq_len: int) -> tuple[Example, bool]:
    """The example cut to its first `seq_len` tokens, and whether it was cut."""
    if len(example) <= seq_len:
        return example, False
    return Example(example.input_ids[:seq_len], example.labels[:seq_len]), True


def _segment(example: Example) -> list[int]:
    """Labels with the first token ignored: nothing in the example precedes it, and in a packed row the
    previous example's last token must not learn to predict it."""
    return [IGNORE_INDEX, *example.labels[1:]] if example.labels else []


def pack(examples: Sequence[Example], seq_len: int) -> list[PackedSequence]:
    """Examples, in order, laid end to end into rows of at most `seq_len` tokens (a new row starts when
    the next example does not fit). Examples longer than `seq_len` are truncated and counted."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    rows: list[PackedSequence] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    truncated = 0

    def flush() -> None:
        nonlocal ids, labels, positions, lengths, truncated
        if lengths:
            rows.append(PackedSequence(ids, labels, positions, lengths, truncated))
        ids, labels, positions, lengths, truncated = [], [], [], [], 0

    for example in examples:
        if not len(example):
            continue
        example, was_cut = truncate(example, seq_len)
        if len(ids) + len(example) > seq_len:
            flush()
        ids.extend(example.input_ids)
        labels.extend(_segment(example))
        positions.extend(range(len(example)))
        lengths.append(len(example))
        truncated += was_cut
    flush()
    return rows


def single(example: Example, seq_len: int | None = None) -> PackedSequence:
    """One example as a row of its own (no packing), truncated to `seq_len` when given."""
    cut = False
    if seq_len is not None:
        example, cut = truncate(example, seq_len)
    return PackedSequence(
        list(example.input_ids), _segment(example), list(range(len(example))), [len(example)], int(cut)
    )


def bucket(
    examples: Sequence[Example],
    max_tokens_per_batch: int,
    seq_len: int | None = None,
    seed: int | None = None,
) -> list[list[PackedSequence]]:
    """Padding-free-ish batches for models that cannot pack: one example per row, examples sorted by
    length so a batch holds similar lengths, as many rows per batch as keep rows × longest row within
    `max_tokens_per_batch` (a longer example gets a batch of its own). With `seed`, the batch order is
    shuffled (the batches themselves stay length-sorted)."""
    if max_tokens_per_batch <= 0:
        raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens_per_batch}")
    rows = sorted((single(e, seq_len) for e in examples if len(e)), key=len)  # stable: ties keep order
    batches: list[list[PackedSequence]] = []
    current: list[PackedSequence] = []
    for row in rows:
        # Sorted ascending: the new row is the longest of the batch it joins.
        if current and (len(current) + 1) * len(row) > max_tokens_per_batch:
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    if seed is not None:
        random.Random(seed).shuffle(batches)
    return batches


# ---- tensors --------------------------------------------------------------------------------------
def block_causal_mask(
    rows: Sequence[PackedSequence], length: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[B, 1, L, L] additive mask: 0 where token i may attend to token j (same example, j ≤ i), -inf
    elsewhere. A padding token attends to itself only, so no row of the mask is all -inf (softmax would
    return NaN there and spread it through the next layer's values)."""
    segments = torch.empty(len(rows), length, dtype=torch.long)
    for r, row in enumerate(rows):
        seg = [i for i, n in enumerate(row.lengths) for _ in range(n)]
        segments[r, : len(seg)] = torch.tensor(seg, dtype=torch.long)
        # Each padding position is a segment of its own (ids after the examples' ids).
        segments[r, len(seg) :] = torch.arange(len(row.lengths), len(row.lengths) + length - len(seg))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    mask = torch.full((len(rows), 1, length, length), float("-inf"), dtype=dtype)
    return mask.masked_fill(allowed[:, None], 0.0)


def collate(
    batch: Sequence[PackedSequence],
    pad_id: int = 0,
    four_d_mask: bool | None = True,
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a model's forward: input_ids, labels (IGNORE_INDEX on padding),
    position_ids, attention_mask. The mask is the 4D block-diagonal causal mask ([B, 1, L, L] in
    `mask_dtype`: use the model's dtype) or, with `four_d_mask=False`, the usual 2D padding mask
    ([B, L], 1 on tokens), which cannot separate packed examples and so refuses rows holding several.
    `four_d_mask=None` picks: 4D only when some row packs several examples. The 2D mask means the same
    attention for one example per row and lets SDPA/flash kernels take their causal fast path instead
    of materializing an L×L mask (long context rows)."""
    if not batch:
        raise ValueError("collate needs at least one sequence")
    if four_d_mask is None:
        four_d_mask = any(len(row.lengths) > 1 for row in batch)
    length = max(len(row) for row in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(batch), length), dtype=torch.long)
    for r, row in enumerate(batch):
        n = len(row)
        input_ids[r, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[r, :n] = torch.tensor(row.labels, dtype=torch.long)
        position_ids[r, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        # Padding continues the last example's positions: never a restart at 0 (which would read as
        # one more packed example), always within the model's position range.
        last = row.position_ids[-1] + 1 if n else 0
        position_ids[r, n:] = torch.arange(last, last + length - n)
    if four_d_mask:
        attention_mask = block_causal_mask(batch, length, mask_dtype)
    else:
        if any(len(row.lengths) > 1 for row in batch):
            raise ValueError("a 2D attention mask cannot keep packed examples apart; use one example per row")
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for r, row in enumerate(batch):
            attention_mask[r, : len(row)] = 1
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
    }


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether this model keeps packed examples apart: run two short examples packed in one row and the
    second one alone, and compare its logits. A family that ignores the 4D mask or the restarted
    position ids (or rejects them) gives False; the answer is cached on the model."""
    cached = getattr(model, "_cyclej_supports_packing", None)
    if cached is not None:
        return bool(cached)
    embed = cast("PreTrainedModel", model).get_input_embeddings()
    vocab = cast(torch.nn.Embedding, embed).num_embeddings
    first = Example([3 % vocab, 5 % vocab, 7 % vocab, 11 % vocab], [IGNORE_INDEX] * 4)
    second = Example([13 % vocab, 17 % vocab, 19 % vocab], [IGNORE_INDEX] * 3)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = collate(pack([first, second], len(first) + len(second)), mask_dtype=param.dtype)
            alone = collate([single(second)], mask_dtype=param.dtype)
            logits_packed = _logits(model, packed, param.device)[0, len(first) :]
            logits_alone = _logits(model, alone, param.device)[0]
        tol = 1e-4 if param.dtype == torch.float32 else 3e-2
        scale = 1.0 + float(logits_alone.abs().max())
        ok = bool(torch.allclose(logits_packed.float(), logits_alone.float(), rtol=0.0, atol=tol * scale))
    except (TypeError, ValueError, RuntimeError):
        ok = False  # the family rejects a 4D mask or position ids
    finally:
        model.train(was_training)
    # nn.Module's stub allows only tensors and modules here; any attribute value works at runtime.
    model._cyclej_supports_packing = ok  # type: ignore[assignment]
    return ok


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    return model(**inputs).logits
