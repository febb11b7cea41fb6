"""Datasets for `plan train`: local files read, rendered to token ids and loss labels, batched.

Files: JSON lines (`.jsonl`), JSON (a list of records), CSV and Parquet (read with pandas).
Formats (a `datasets:` entry's `type`, Axolotl's names):

- `alpaca`: `instruction`, optional `input`, `output`; the Stanford Alpaca prompt, the response
  followed by EOS. Loss on the response only unless `train_on_inputs`.
- `chat`: `messages` (or the entry's `field`), a list of `{role, content}`, rendered with the
  tokenizer's own chat template. Loss on the assistant turns only unless `train_on_inputs`; each
  assistant turn's header (what `add_generation_prompt` writes) is never trained on.
- `completion`: the `text` field (or `field`), all of it trained on.
- `classification`: `text` (or `field`) and `label` (or `label_field`); labels are numbered in
  sorted order of their names and the model gets a sequence-classification head.

Every problem is a DataError naming the file and, for a bad line or record, its number.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

IGNORE = -100  # the label that torch's cross-entropy skips

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """A dataset that cannot be used: one line naming the file and what to fix."""


@dataclass
class Examples:
    """Tokenised examples: `input_ids`/`labels` per example (causal LM), or `input_ids` and a class
    index per example (classification, with `classes` the label names)."""
    input_ids: list
    labels: list
    classes: list | None = None
    truncated: int = 0
    dropped: int = 0  # examples left with no token to train on (their answer truncated away)

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx) -> "Examples":
        return Examples([self.input_ids[i] for i in idx], [self.labels[i] for i in idx], self.classes)


def read_records(path: str, skip_bad_lines: bool = False) -> tuple[list[dict], int]:
    """The records of a local file, and how many bad JSONL lines were skipped."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such dataset file")
    if p.is_dir():
        raise DataError(f"{path}: is a directory; name a {'/'.join(SUFFIXES)} file")
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown dataset format '{suffix or p.name}'; use one of {', '.join(SUFFIXES)}")
    skipped = 0
    try:
        if suffix == ".jsonl":
            records = []
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        if not isinstance(rec, dict):
                            raise ValueError(f"a JSON {type(rec).__name__}, not an object")
                    except ValueError as e:
                        if skip_bad_lines:
                            skipped += 1
                            continue
                        raise DataError(f"{path}: line {n} is not a JSON object ({str(e).splitlines()[0]}); "
                                        "fix it or pass --skip-bad-lines") from None
                    records.append(rec)
        elif suffix == ".json":
            with open(p, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
                data = next(iter(data.values()))  # {"train": [...]}
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{path}: a JSON dataset is a list of objects")
            records = data
        else:
            import pandas as pd
            df = pd.read_csv(p, dtype=str, keep_default_na=False) if suffix == ".csv" else pd.read_parquet(p)
            records = df.to_dict(orient="records")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); re-encode it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except DataError:
        raise
    except Exception as e:  # pandas/pyarrow parse errors
        raise DataError(f"{path}: cannot read "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not records:
        raise DataError(f"{path}: no records")
    return records, skipped


def _field(rec: dict, name: str, n: int, path: str, kind: str, required: bool = True) -> str:
    v = rec.get(name)
    if v is None or (isinstance(v, float) and v != v):  # missing or NaN (pandas)
        if required:
            raise DataError(f"{path}: record {n} has no '{name}' field, which the {kind} format needs")
        return ""
    return v if isinstance(v, str) else str(v)


def _check_messages(messages, n: int, path: str) -> None:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{path}: record {n}: 'messages' must be a list of {{role, content}} objects")


def check_records(records: list[dict], fmt: str, path: str, text_field: str | None = None,
                  label_field: str | None = None) -> None:
    """Every record has the fields `fmt` needs; the first that lacks one is named. Cheap (no
    tokenizer): the launcher runs it before starting any process, `tokenize` again."""
    if fmt == "chat":
        for n, r in enumerate(records, 1):
            _check_messages(r.get(text_field or "messages"), n, path)
        return
    need = {"alpaca": ["instruction", "output"], "completion": [text_field or "text"],
            "classification": [text_field or "text", label_field or "label"]}
    if fmt not in need:
        raise DataError(f"{path}: unknown dataset type '{fmt}'")
    for n, r in enumerate(records, 1):
        for name in need[fmt]:
            _field(r, name, n, path, fmt)


def _chat_segments(tok, messages, n: int, path: str, train_on_inputs: bool) -> list[tuple[str, bool]]:
    """The chat rendered by the tokenizer's template, cut into (text, trained) pieces: each
    message's text is what its prefix adds to the rendering; an assistant message's generation
    header is never trained on."""
    _check_messages(messages, n, path)
    if getattr(tok, "chat_template", None) is None:
        raise DataError(f"{path}: the chat format needs a tokenizer with a chat template; this one has none")
    out, prev = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else prev
            if head.startswith(prev) and len(head) > len(prev):
                out.append((head[len(prev):], train_on_inputs))
                prev = head
        text = tok.apply_chat_template(messages[:i + 1], tokenize=False)
        if not text.startswith(prev):
            raise DataError(f"{path}: record {n}: the chat template does not render this chat incrementally")
        out.append((text[len(prev):], train_on_inputs or m["role"] == "assistant"))
        prev = text
    return out


def _tokens(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _bos(tok) -> list[int]:
    """BOS where the tokenizer adds one by itself (Llama does, GPT-2 and SmolLM2's do not)."""
    bos = tok.bos_token_id
    return [bos] if bos is not None and tok("a")["input_ids"][:1] == [bos] else []


def tokenize(records: list[dict], tok, fmt: str, seq_len: int, path: str, *, train_on_inputs: bool = False,
             text_field: str | None = None, label_field: str | None = None,
             classes: list | None = None) -> Examples:
    """Render and tokenise each record; longer than `seq_len` is truncated and counted."""
    check_records(records, fmt, path, text_field, label_field)
    ids_all, labels_all, truncated = [], [], 0
    if fmt == "classification":
        tf, lf = text_field or "text", label_field or "label"
        names = [_field(r, lf, n, path, fmt) for n, r in enumerate(records, 1)]
        classes = classes or sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        for n, (r, name) in enumerate(zip(records, names, strict=True), 1):
            if name not in index:
                raise DataError(f"{path}: record {n} has label '{name}', not one of the {len(classes)} training labels")
            ids = tok(_field(r, tf, n, path, fmt), truncation=False)["input_ids"]
            if len(ids) > seq_len:
                truncated += 1
                ids = ids[:seq_len - 1] + ids[-1:]  # keep [SEP]/EOS last
            ids_all.append(ids)
            labels_all.append(index[name])
        return Examples(ids_all, labels_all, classes, truncated)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    bos = _bos(tok) if fmt != "chat" else []
    for n, r in enumerate(records, 1):
        if fmt == "alpaca":
            ins, inp = _field(r, "instruction", n, path, fmt), _field(r, "input", n, path, fmt, required=False)
            prompt = (ALPACA_PROMPT_INPUT if inp.strip() else ALPACA_PROMPT).format(instruction=ins, input=inp)
            segs = [(prompt, train_on_inputs), (_field(r, "output", n, path, fmt), True)]
        elif fmt == "chat":
            segs = _chat_segments(tok, r.get(text_field or "messages"), n, path, train_on_inputs)
        elif fmt == "completion":
            segs = [(_field(r, text_field or "text", n, path, fmt), True)]
        ids, labels = list(bos), [IGNORE] * len(bos)
        for text, trained in segs:
            t = _tokens(tok, text)
            ids += t
            labels += t if trained else [IGNORE] * len(t)
        if fmt != "chat":
            ids += eos
            labels += eos
        if len(ids) > seq_len:
            truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if all(x == IGNORE for x in labels[1:]):
            continue  # nothing to learn (the response was cut off): dropped and counted
        ids_all.append(ids)
        labels_all.append(labels)
    ex = Examples(ids_all, labels_all, None, truncated, dropped=len(records) - len(ids_all))
    if not ids_all:
        raise DataError(f"{path}: no example has a token to train on within sequence_len={seq_len}")
    return ex


def split(ex: Examples, val_fraction: float, seed: int) -> tuple[Examples, Examples | None]:
    """A seeded random validation split (at least one example when the fraction is positive)."""
    if val_fraction <= 0:
        return ex, None
    idx = list(range(len(ex)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(round(val_fraction * len(idx))))
    if n_val >= len(idx):
        raise DataError(f"val_set_size={val_fraction} leaves no training examples out of {len(idx)}")
    return ex.subset(sorted(idx[n_val:])), ex.subset(sorted(idx[:n_val]))


def pack(ex: Examples, seq_len: int) -> list[dict]:
    """Sample packing: whole examples placed first-fit-decreasing into rows of `seq_len` tokens,
    `position_ids` restarting at each example, so that attention does not cross examples
    (transformers reads packed sequences off the position ids) and the loss skips each
    example's first label. Rows are padded to `seq_len`, so every micro-batch has the planned
    shape."""
    order = sorted(range(len(ex)), key=lambda i: -len(ex.input_ids[i]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(ex.input_ids[i])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(seq_len - n)
    rows = []
    for b in bins:
        ids, labels, pos = [], [], []
        for i in b:
            ids += ex.input_ids[i]
            lab = list(ex.labels[i])
            lab[0] = IGNORE  # no prediction of an example's first token from the previous example
            labels += lab
            pos += list(range(len(ex.input_ids[i])))
        pad = seq_len - len(ids)
        rows.append({"input_ids": ids + [0] * pad, "labels": labels + [IGNORE] * pad,
                     "position_ids": pos + list(range(pad)), "length": len(ids)})
    return rows


def rows(ex: Examples, seq_len: int, packing: bool) -> list[dict]:
    if packing:
        return pack(ex, seq_len)
    if ex.classes is not None:
        return [{"input_ids": i, "labels": c} for i, c in zip(ex.input_ids, ex.labels, strict=False)]
    return [{"input_ids": i, "labels": lab} for i, lab in zip(ex.input_ids, ex.labels, strict=False)]


PAD_MULTIPLE = 8
"""The Collator pads a micro-batch to its longest row rounded up to a multiple of this."""

PACKING_PAYS = 0.75
"""Sample packing is chosen when its rows hold the epoch in at most this fraction of the token
slots that padding per micro-batch computes. Not for less: a packed row's attention spans the
whole row (benchmarks/train_vs_hf.py measured packed rows of 512 tokens 30% dearer per token slot
than short padded rows on CPU), which eats a small saving."""


def padded(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class DataShape:
    """What a tokenised dataset holds and the micro-batch shape a run over it sees: `seq_len`
    is the longest example padded as the Collator pads it (without packing) or the packed row
    length; `rows` the sequences an epoch holds (examples, or packed rows)."""
    examples: int
    tokens: int
    shortest: int
    longest: int
    truncated: int
    dropped: int
    seq_len: int
    packing: bool
    rows: int
    padded_slots: int  # token slots an epoch computes padded per micro-batch of `batch`
    packed_slots: int  # ... packed into rows of `seq_len`
    batch: int

    def line(self) -> str:
        how = (f"packed into {self.rows:,} rows of {self.seq_len:,} tokens ({self.packed_slots:,} token slots "
               f"against {self.padded_slots:,} padded per micro-batch of {self.batch})" if self.packing else
               f"padded per micro-batch (at most {self.seq_len:,} tokens, the longest example padded to a multiple "
               f"of {PAD_MULTIPLE}; packing would compute {self.packed_slots:,} token slots against "
               f"{self.padded_slots:,}: not worth it)")
        cut = f"; {self.truncated:,} truncated" if self.truncated else ""
        cut += f", {self.dropped:,} dropped (nothing left to train on)" if self.dropped else ""
        return (f"{self.examples:,} examples, {self.shortest:,} to {self.longest:,} tokens each, "
                f"{self.tokens:,} in all{cut}; {how}")


def padded_slots(lengths: list[int], batch: int) -> int:
    """Token slots an epoch computes when each micro-batch of `batch` examples is padded to its
    longest (rounded up to PAD_MULTIPLE), in the order given."""
    return sum(padded(max(lengths[i:i + batch])) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))


def data_shape(ex: Examples, batch: int, row_len: int | None = None) -> DataShape:
    """The shape of an epoch over `ex` at micro-batch `batch`: padding per micro-batch, or
    packing into rows of `row_len` (default: the longest example, padded), whichever computes
    fewer token slots by PACKING_PAYS. Packing into rows no longer than the longest padded batch
    keeps the planned micro-batch shape: the memory plan holds either way."""
    lengths = [len(i) for i in ex.input_ids]
    longest = max(lengths)
    row = row_len or padded(longest)
    rows = len(pack(ex, row)) if ex.classes is None else len(lengths)
    pad_slots, pack_slots = padded_slots(lengths, batch), rows * row
    packing = ex.classes is None and pack_slots <= PACKING_PAYS * pad_slots
    return DataShape(examples=len(lengths), tokens=sum(lengths), shortest=min(lengths), longest=longest,
                     truncated=ex.truncated, dropped=ex.dropped, seq_len=row if packing else padded(longest),
                     packing=packing, rows=rows if packing else len(lengths), padded_slots=pad_slots,
                     packed_slots=pack_slots, batch=batch)


def attention_masked(batch: dict) -> bool:
    """Whether transformers gives attention an explicit mask for this micro-batch (what
    `Settings.attention_mask` says): a padded row (a 0 in `attention_mask`; masking_utils.py
    `_ignore_causal_mask_sdpa` skips the mask only when it is all ones) or a packed row whose
    position ids restart (masking_utils.py `find_packed_sequence_indices`: a step other than +1)."""
    mask, pos = batch.get("attention_mask"), batch.get("position_ids")
    if mask is not None and not bool(mask.all()):
        return True
    return pos is not None and bool((pos[:, 1:] - pos[:, :-1] != 1).any())


def head_tokens(batch: dict) -> int:
    """The positions of a micro-batch whose next token has a label: what the output head scores
    when the loss runs over them only (`Settings.head_tokens`)."""
    return int((batch["labels"][:, 1:] != -100).sum())


class Collator:
    """Pads a micro-batch to its longest row (rounded up to a multiple of 8), labels with -100
    and an attention mask; packed rows are already full and carry position ids, and `length`,
    their tokens before padding, which the trainer counts and takes out before the forward."""

    def __init__(self, pad_id: int, multiple: int = PAD_MULTIPLE):
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, batch: list[dict]) -> dict:
        import torch
        if "position_ids" in batch[0]:
            return {k: torch.tensor([r[k] for r in batch]) for k in ("input_ids", "labels", "position_ids", "length")}
        n = max(len(r["input_ids"]) for r in batch)
        n = -(-n // self.multiple) * self.multiple
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        seq_labels = isinstance(batch[0]["labels"], int)
        labels = torch.tensor([r["labels"] for r in batch]) if seq_labels else torch.full((len(batch), n), IGNORE)
        for j, r in enumerate(batch):
            k = len(r["input_ids"])
            ids[j, :k] = torch.tensor(r["input_ids"])
            mask[j, :k] = 1
            if not seq_labels:
                labels[j, :k] = torch.tensor(r["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
