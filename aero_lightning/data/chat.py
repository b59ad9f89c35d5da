"""Chat prompts with audio slots, and training labels on the assistant reply only.

This module is the one home of the chat format: the default ASR instruction (:data:`DEFAULT_ASR_PROMPT`), the
messages of an ASR sample (:func:`asr_messages`), their rendering with audio slots and their tokenisation. It is
copied into exported model folders as remote code, so it imports nothing beyond the standard library.

Messages use the HF multimodal chat format::

    [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Please recognize ..."}]},
     {"role": "assistant", "content": [{"type": "text", "text": "the cat sat"}]}]

Each audio part becomes ``<|audio_bos|>`` + N x ``<|AUDIO|>`` + ``<|audio_eos|>`` (Qwen2-Audio's convention), where N
is the number of projected audio embeddings of that clip; the LLM tokenizer's own chat template (ChatML for Qwen)
renders the conversation. Labels are -100 everywhere except the tokens of each assistant reply and the template's
end-of-turn token that closes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS_TOKEN = "<|audio_bos|>"
AUDIO_EOS_TOKEN = "<|audio_eos|>"
AUDIO_SPECIAL_TOKENS = (AUDIO_BOS_TOKEN, AUDIO_TOKEN, AUDIO_EOS_TOKEN)

DEFAULT_ASR_PROMPT = "Please recognize the speech and only output the recognized content:"
"""ASR instruction that follows the audio: the one Aero-1-Audio is evaluated with in lmms-eval."""


def asr_messages(transcript: str, prompt: str = DEFAULT_ASR_PROMPT) -> list[dict[str, Any]]:
    """Build the HF multimodal chat messages of one ASR sample.

    Args:
        transcript: the exact reference text (the assistant's reply).
        prompt: the user's instruction that follows the audio.

    Returns:
        ``[{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": transcript}]}]``.
    """
    return [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": transcript}]},
    ]


@dataclass
class EncodedChat:
    """One tokenised conversation.

    Attributes:
        input_ids: token ids, length L.
        labels: length L; -100 outside assistant replies.
        num_audio_tokens: ``<|AUDIO|>`` slots per audio part, in order.
    """

    input_ids: list[int]
    labels: list[int]
    num_audio_tokens: list[int]


def _content_to_text(content, audio_counts: list[int], cursor: list[int]) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append(part["text"])
        elif kind == "audio":
            if cursor[0] >= len(audio_counts):
                raise ValueError(
                    f"the conversation has more audio parts than the {len(audio_counts)} audio clip(s) given"
                )
            n = audio_counts[cursor[0]]
            cursor[0] += 1
            parts.append(AUDIO_BOS_TOKEN + AUDIO_TOKEN * n + AUDIO_EOS_TOKEN)
        else:
            raise ValueError(f"unsupported message part type {kind!r}; expected 'text' or 'audio'")
    return "".join(parts)


def render_messages(messages: Sequence[dict], num_audio_tokens: Sequence[int]) -> list[dict]:
    """Flatten multimodal messages into text messages with expanded audio slots.

    Args:
        messages: HF-style chat messages; ``content`` is a string or a list of ``text`` / ``audio`` parts.
        num_audio_tokens: projected audio embeddings per audio part, in order of appearance.

    Returns:
        Messages whose ``content`` is a plain string, ready for ``tokenizer.apply_chat_template``.

    Raises:
        ValueError: if the number of audio parts differs from ``len(num_audio_tokens)``.
    """
    counts = list(num_audio_tokens)
    cursor = [0]
    out = [{"role": m["role"], "content": _content_to_text(m["content"], counts, cursor)} for m in messages]
    if cursor[0] != len(counts):
        raise ValueError(
            f"{len(counts)} audio clip(s) given but the conversation has {cursor[0]} audio part(s)"
        )
    return out


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(
    tokenizer,
    messages: Sequence[dict],
    num_audio_tokens: Sequence[int],
    end_of_turn_token: str = "<|im_end|>",
    add_generation_prompt: bool = False,
) -> EncodedChat:
    """Tokenise a conversation and build labels on the assistant replies.

    The template is rendered incrementally: for every assistant turn the text rendered up to the generation
    prompt is the context (labels -100), and what that turn adds is the reply; its tokens up to and including
    ``end_of_turn_token`` get labels, anything the template adds after it (ChatML's newline) does not.

    Args:
        tokenizer: HF tokenizer with a chat template and the audio special tokens.
        messages: chat messages (see module docstring).
        num_audio_tokens: ``<|AUDIO|>`` slots per audio part.
        end_of_turn_token: the template's end-of-turn token that closes a reply and is trained.
        add_generation_prompt: for inference: drop trailing assistant turns' labels and append the generation
            prompt (labels are all -100).

    Returns:
        :class:`EncodedChat`.

    Raises:
        ValueError: if the template is not prefix-stable (a rendered prefix is not a prefix of the whole), or on
            an audio part / clip count mismatch.
    """
    flat = render_messages(messages, num_audio_tokens)
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn_token)
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(flat):
        if message["role"] != "assistant":
            continue
        context = _render(tokenizer, flat[:i], add_generation_prompt=True)
        full = _render(tokenizer, flat[: i + 1], add_generation_prompt=False)
        if not context.startswith(rendered) or not full.startswith(context):
            raise ValueError("the chat template is not prefix-stable; cannot locate assistant replies")
        ctx_ids = _encode(tokenizer, context[len(rendered) :])
        reply_ids = _encode(tokenizer, full[len(context) :])
        input_ids += ctx_ids
        labels += [IGNORE_INDEX] * len(ctx_ids)
        if eot_id in reply_ids:
            cut = reply_ids.index(eot_id) + 1
        else:
            cut = len(reply_ids)
        input_ids += reply_ids
        labels += reply_ids[:cut] + [IGNORE_INDEX] * (len(reply_ids) - cut)
        rendered = full
    if add_generation_prompt:
        tail = _render(tokenizer, flat, add_generation_prompt=True)
    else:
        tail = _render(tokenizer, flat, add_generation_prompt=False)
    if not tail.startswith(rendered):
        raise ValueError("the chat template is not prefix-stable; cannot locate assistant replies")
    tail_ids = _encode(tokenizer, tail[len(rendered) :])
    input_ids += tail_ids
    labels += [IGNORE_INDEX] * len(tail_ids)
    if add_generation_prompt:
        labels = [IGNORE_INDEX] * len(input_ids)
    return EncodedChat(input_ids=input_ids, labels=labels, num_audio_tokens=list(num_audio_tokens))


TRANSCRIPT_TASKS = ("asr",)
"""Tasks whose reply is what the audio says: only their documents are CTC targets. A label, an answer or a caption is
not a transcript, and CTC towards it would teach the encoder frames to spell it (:func:`transcript_documents`)."""


def transcript_documents(tasks) -> list[bool]:
    """Which documents of a batch carry CTC targets: those whose task is in :data:`TRANSCRIPT_TASKS`.

    Args:
        tasks: each document's task (a collated batch's ``tasks``), in document order.

    Returns:
        One bool per document.
    """
    return [task in TRANSCRIPT_TASKS for task in tasks]


def ctc_target_mask(labels, end_of_turn_id: int):
    """Mask of the CTC targets in ``labels``: the reply tokens without the end-of-turn token.

    The auxiliary CTC term (:mod:`aero_lightning.model.ctc`) aligns the encoder frames with what the audio says, and
    the audio does not say the template's end-of-turn token (``<|im_end|>``).

    Args:
        labels: ``(..., L)`` integer tensor of unshifted targets, -100 outside replies.
        end_of_turn_id: id of the end-of-turn token.

    Returns:
        A bool tensor of the same shape.
    """
    return (labels != IGNORE_INDEX) & (labels != end_of_turn_id)


def prompt_messages(messages: Sequence[dict]) -> list[dict]:
    """The messages up to (not including) the last assistant turn, for generation."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return list(messages[:last])


def reference_text(messages: Sequence[dict]) -> str:
    """Text of the last assistant turn (the reference transcript for ASR samples)."""
    for m in reversed(messages):
        if m["role"] == "assistant":
            c = m["content"]
            return (
                c if isinstance(c, str) else "".join(p.get("text", "") for p in c if p.get("type") == "text")
            )
    return ""
