"""Prompt templates, in one place: the three LLaVA instruction kinds and LLaVA-1.5's chat format.

LLaVA's instruction data has three kinds (Liu et al., "Visual Instruction Tuning"): multi-turn
*conversation* about what is visible, *detailed description*, and *complex reasoning* that needs the
picture plus world knowledge. The annotator asks the MLLM one question of each kind per image; the
question is picked from the kind's list by a stable hash of the image id, so reruns ask the same.
"""

from __future__ import annotations

import zlib

from pretrain.teacher import IMAGE_TOKEN

KINDS: dict[str, tuple[str, ...]] = {
    "conversation": (
        "What is the main object in the image?",
        "What can you see in this picture?",
        "What is shown in the image, and what does it look like?",
    ),
    "detailed_description": (
        "Describe the following image in detail.",
        "Provide a detailed description of the given image.",
        "Explain the visual content of the image in great detail.",
    ),
    "complex_reasoning": (
        "What might be the purpose of what is shown in the image, and why?",
        "What can be inferred about the context of this image? Explain your reasoning.",
        "What is unusual or noteworthy about this image, and why?",
    ),
}

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def question(kind: str, image_id: str) -> str:
    """The question of `kind` asked about `image_id` (stable across runs and machines)."""
    options = KINDS[kind]
    return options[zlib.crc32(image_id.encode()) % len(options)]


def human_turn(text: str) -> str:
    """The first human turn as LLaVA stores it: the image placeholder on its own line, then the question."""
    return f"{IMAGE_TOKEN}\n{text}"


def user_prefix(value: str) -> str:
    """LLaVA-1.5's text before an answer ("USER: ... ASSISTANT:"); the answer follows after a space."""
    return f"USER: {value} ASSISTANT:"


def generation_prompt(kind: str, image_id: str) -> str:
    """What the annotating MLLM is given for one image and one instruction kind."""
    return f"{SYSTEM} {user_prefix(human_turn(question(kind, image_id)))}"
