"""Annotation: the MLLM writes LLaVA-format instruction data for a folder of unlabeled images.

Output is one JSON object per line (JSONL), each in LLaVA's layout (`id`, `image`, `conversations`) plus
the instruction `kind` and which `annotator` wrote it. The file is append-only: every record is written
whole and flushed before the next image starts, so a crash or Ctrl-C loses nothing already written, and
a rerun reads the ids present and skips them. A torn last line (power loss mid-write) is cut off on
resume. An image that fails to decode is logged, skipped and counted; it never aborts the run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from flcore.images import image_files
from flcore.progress import progress
from pretrain.prompts import KINDS, generation_prompt, human_turn, question
from pretrain.teacher import LlavaTeacher

log = logging.getLogger(__name__)


@dataclass
class AnnotationSummary:
    """What one annotation pass did; `failed` lists images that could not be decoded."""

    images: int = 0
    written: int = 0
    skipped_done: int = 0
    failed: list[str] = field(default_factory=list)
    annotator: str = ""

    def as_dict(self) -> dict:
        return {**asdict(self), "failed_count": len(self.failed)}


def list_images(root: Path) -> list[str]:
    """Image files under `root`, as sorted paths relative to it (LLaVA's `image` field)."""
    return [str(path.relative_to(root)) for path in image_files(root)]


def record_id(image: str, kind: str) -> str:
    return f"{Path(image).with_suffix('').as_posix()}-{kind}"


def done_ids(out: Path) -> set[str]:
    """Ids already in the output; drops a torn final line so appends stay valid JSONL."""
    if not out.is_file():
        return set()
    raw = out.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end != len(raw):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", out, len(raw) - end)
        with out.open("r+b") as f:
            f.truncate(end)
    return {json.loads(line)["id"] for line in raw[:end].decode().splitlines() if line.strip()}


def decode_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


@torch.no_grad()
def answer(teacher: LlavaTeacher, image: Image.Image, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer of the MLLM to one prompt about one image."""
    inputs = teacher.processor(images=image, text=prompt, return_tensors="pt")
    inputs = {k: v.to(teacher.model.device) for k, v in inputs.items()}
    out = teacher.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return teacher.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def annotate(
    teacher: LlavaTeacher,
    image_root: Path,
    out: Path,
    images: Sequence[str] | None = None,
    kinds: Iterable[str] = tuple(KINDS),
    max_new_tokens: int = 64,
) -> AnnotationSummary:
    """Annotate every image under `image_root` (or the listed relative paths) for each instruction kind."""
    images = list_images(image_root) if images is None else list(images)
    kinds = tuple(kinds)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out)
    summary = AnnotationSummary(images=len(images), annotator=teacher.note)
    with out.open("a", encoding="utf-8") as sink:
        for image in progress(images, desc="annotate", unit="image"):
            todo = [k for k in kinds if record_id(image, k) not in done]
            summary.skipped_done += len(kinds) - len(todo)
            if not todo:
                continue
            try:
                rgb = decode_rgb(image_root / image)
            except (OSError, ValueError) as err:
                log.warning("skipping %s: cannot decode image (%s)", image_root / image, err)
                summary.failed.append(image)
                continue
            for kind in todo:
                rid = record_id(image, kind)
                text = answer(teacher, rgb, generation_prompt(kind, rid), max_new_tokens)
                record = {
                    "id": rid,
                    "image": image,
                    "conversations": [
                        {"from": "human", "value": human_turn(question(kind, rid))},
                        {"from": "gpt", "value": text},
                    ],
                    "kind": kind,
                    "annotator": teacher.note,
                }
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                summary.written += 1
    if summary.failed:
        log.warning("%d image(s) could not be decoded and were skipped", len(summary.failed))
    return summary
