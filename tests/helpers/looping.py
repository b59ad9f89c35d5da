"""A tiny AeroModel whose greedy reply is one token repeated forever: a real model in a real generation loop, for
the repetition guard's tests."""

from __future__ import annotations

import torch

from aero_lightning.data.chat import encode_chat
from aero_lightning.eval.decode import user_messages


def make_looping(model, word: str = "the") -> int:
    """Make ``model`` (an AeroModel with a Qwen2 LLM and tied embeddings) reply ``word`` ``word`` ``word`` ...

    Every attention and MLP output projection of the LLM is zeroed, so its last hidden state is the RMS-normalised
    embedding of the current input token and, with tied embeddings, the argmax is the token most similar to that
    embedding: the token itself (random embeddings are nearly orthogonal). The embedding of the generation prompt's
    last token is set to half of ``word``'s, so the first reply token is ``word`` and every later one repeats it.

    Returns:
        The id of the repeated token.
    """
    tok = model.tokenizer
    target = tok(word, add_special_tokens=False)["input_ids"]
    if len(target) != 1:
        raise ValueError(f"{word!r} is {len(target)} tokens; pick a word of one token")
    last = encode_chat(
        tok, user_messages(), [1], model.end_of_turn_token, add_generation_prompt=True
    ).input_ids[-1]
    with torch.no_grad():
        for layer in model.llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.llm.get_input_embeddings().weight
        embeddings[last] = 0.5 * embeddings[target[0]]
    return target[0]
