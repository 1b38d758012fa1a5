"""LLaVA-format instruction data: reading it (CC-595K `chat.json`, or JSONL from the annotator) and
turning records into training batches for DWP.

A record is `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}...]}`, the first human
turn holding `<image>`. Any problem in the file raises `AnnotationError` naming the file and line.

Batches decode each image once and derive both inputs from that one decode: CLIP's pixels through the
teacher's image processor (only while alpha < 1 needs them) and the FL backbone's input at the FL image
size, normalised like the FL clients' data. Labels are -100 on everything but the answer tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import torch
from PIL import Image

from flcore.config import ConfigError
from pretrain.prompts import SYSTEM, user_prefix
from pretrain.teacher import IMAGE_TOKEN, LlavaTeacher

log = logging.getLogger(__name__)
IGNORE = -100


class AnnotationError(ConfigError):
    """An annotation file is malformed; the message names file and line (a bad `pretrain-data` input)."""


def image_file(root: Path, name: str) -> Path:
    """A record's image under `root`; AnnotationError when the name leads outside it (`../`, absolute, links)."""
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise AnnotationError(f"image {name!r} is outside the image folder {root}")
    return path


def outside_root(name: str) -> bool:
    """Whether a record's image name leads outside its folder without touching the disk (absolute or `..`)."""
    pure = PurePath(name)
    return pure.is_absolute() or ".." in pure.parts


@dataclass(frozen=True)
class Record:
    id: str
    image: str
    conversations: tuple[tuple[str, str], ...]


def _check(obj: object, where: str) -> Record:
    if not isinstance(obj, dict):
        raise AnnotationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "image", "conversations"):
        if key not in obj:
            raise AnnotationError(f"{where}: record lacks '{key}' (LLaVA layout: id, image, conversations)")
    turns = obj["conversations"]
    if not isinstance(turns, list) or len(turns) < 2:
        raise AnnotationError(f"{where}: 'conversations' must be a list of at least one human and one gpt turn")
    pairs = []
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise AnnotationError(f"{where}: conversation turn {i} must be {{'from': '{expected}', 'value': str}}")
        pairs.append((expected, turn["value"]))
    if IMAGE_TOKEN not in pairs[0][1]:
        raise AnnotationError(f"{where}: the first human turn lacks the '{IMAGE_TOKEN}' placeholder")
    return Record(str(obj["id"]), str(obj["image"]), tuple(pairs))


def _json_array(path: Path, text: str) -> list[Record]:
    """Parse a JSON array element by element, so every error carries the line it starts on."""
    decoder = json.JSONDecoder()
    pos, line, counted, records = 0, 1, 0, []

    def skip(pos: int, seps: str) -> int:
        while pos < len(text) and text[pos] in seps:
            pos += 1
        return pos

    pos = skip(pos, " \t\r\n")
    if text[pos : pos + 1] != "[":
        raise AnnotationError(f"{path}:1: expected a JSON array of records ('[') or JSON lines (.jsonl)")
    pos = skip(pos + 1, " \t\r\n")
    while pos < len(text) and text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from err
        records.append(_check(obj, f"{path}:{line}"))
        pos = skip(end, " \t\r\n")
        if text[pos : pos + 1] == ",":
            pos = skip(pos + 1, " \t\r\n")
        elif text[pos : pos + 1] != "]":
            bad = text.count("\n", 0, pos) + 1
            raise AnnotationError(f"{path}:{bad}: expected ',' or ']' after a record")
    return records


def load_annotations(path: Path) -> list[Record]:
    """Records from a LLaVA JSON array (`chat.json`) or a JSONL file, checked line by line."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return _json_array(path, text)
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err
        records.append(_check(obj, f"{path}:{lineno}"))
    if not records:
        raise AnnotationError(f"{path}: no records")
    return records


@dataclass(frozen=True)
class Tokenized:
    input_ids: torch.Tensor
    labels: torch.Tensor


def tokenize(teacher: LlavaTeacher, record: Record, max_length: int) -> Tokenized:
    """LLaVA-1.5 chat text with `<image>` expanded to the teacher's image-token count; loss on answers only.

    Turns are tokenized piecewise (as LLaVA's own training code does) so each answer's span is exact.
    """
    tok = teacher.processor.tokenizer
    image = IMAGE_TOKEN * teacher.num_image_tokens
    ids, labels = [tok.bos_token_id], [IGNORE]
    for i in range(0, len(record.conversations), 2):
        human = record.conversations[i][1].replace(IMAGE_TOKEN, image)
        prompt = (f"{SYSTEM} " if i == 0 else "") + user_prefix(human)
        prompt_ids = tok(prompt, add_special_tokens=False).input_ids
        ids += prompt_ids
        labels += [IGNORE] * len(prompt_ids)
        if i + 1 < len(record.conversations):
            answer_ids = tok(" " + record.conversations[i + 1][1], add_special_tokens=False).input_ids
            answer_ids.append(tok.eos_token_id)
            ids += answer_ids
            labels += answer_ids
    if len(ids) > max_length:
        if ids[max_length:].count(teacher.image_token_id):
            raise AnnotationError(f"record {record.id}: max length {max_length} cuts into the image tokens")
        ids, labels = ids[:max_length], labels[:max_length]
    return Tokenized(torch.tensor(ids), torch.tensor(labels))


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    fl_pixels: torch.Tensor
    clip_pixels: torch.Tensor | None


class LlavaSamples:
    """Records + image folder -> DWP batches; undecodable images are logged, skipped and counted."""

    def __init__(
        self,
        records: Sequence[Record],
        image_root: Path,
        teacher: LlavaTeacher,
        fl_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        max_length: int = 512,
    ) -> None:
        self.records, self.image_root, self.teacher = list(records), image_root, teacher
        self.fl_size, self.max_length = fl_size, max_length
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, record: Record) -> Image.Image | None:
        try:
            with Image.open(image_file(self.image_root, record.image)) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            if record.image not in self.failed:
                log.warning("skipping %s: cannot decode image (%s)", self.image_root / record.image, err)
                self.failed.add(record.image)
            return None

    def _fl_pixels(self, images: list[Image.Image]) -> torch.Tensor:
        arr = np.stack([np.asarray(im.resize((self.fl_size, self.fl_size), Image.BILINEAR)) for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def batch(self, indices: Sequence[int], need_clip: bool) -> Batch | None:
        """One padded batch; None when every image in it failed to decode."""
        kept, images = [], []
        for i in indices:
            record = self.records[i]
            image = self._decode(record)
            if image is not None:
                kept.append(tokenize(self.teacher, record, self.max_length))
                images.append(image)
        if not kept:
            return None
        pad = self.teacher.processor.tokenizer.pad_token_id
        width = max(len(t.input_ids) for t in kept)
        ids = torch.full((len(kept), width), pad, dtype=torch.long)
        labels = torch.full((len(kept), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(kept), width), dtype=torch.long)
        for row, t in enumerate(kept):
            ids[row, : len(t.input_ids)] = t.input_ids
            labels[row, : len(t.labels)] = t.labels
            mask[row, : len(t.input_ids)] = 1
        clip = None
        if need_clip:
            clip = self.teacher.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return Batch(ids, mask, labels, self._fl_pixels(images), clip)

    def iterate(self, batch_size: int, gen: torch.Generator, need_clip: Callable[[], bool]) -> Iterator[Batch]:
        """Shuffled batches; `need_clip()` is asked per batch, so CLIP preprocessing stops once alpha is 1."""
        order = torch.randperm(len(self.records), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            batch = self.batch(order[start : start + batch_size], need_clip())
            if batch is not None:
                yield batch
