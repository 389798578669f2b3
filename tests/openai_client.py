"""Talks to `coordgen serve` with the official openai client, as an app would, and prints
one JSON object with what it got; tests/server.rs checks it against `coordgen generate`.

usage: python openai_client.py BASE_URL API_KEY MODEL CHAT_PROMPT TEXT_PROMPT
"""

import json
import sys

import openai

base, key, model, chat_prompt, text_prompt = sys.argv[1:6]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
out = {}

out["models"] = [m.id for m in client.models.list().data]

msgs = [{"role": "user", "content": chat_prompt}]
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=32, temperature=0)
out["chat"] = r.choices[0].message.content
out["chat_finish"] = r.choices[0].finish_reason
out["chat_usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]

pieces, usage, finish = [], None, None
for chunk in client.chat.completions.create(
    model=model, messages=msgs, max_tokens=32, temperature=0, stream=True, stream_options={"include_usage": True}
):
    if chunk.usage is not None:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens]
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
out["chat_stream"] = "".join(pieces)
out["chat_stream_usage"] = usage
out["chat_stream_finish"] = finish

r = client.completions.create(model=model, prompt=text_prompt, max_tokens=24, temperature=0)
out["completion"] = r.choices[0].text
out["completion_stream"] = "".join(
    c.choices[0].text for c in client.completions.create(model=model, prompt=text_prompt, max_tokens=24, temperature=0, stream=True) if c.choices
)

# Seeded sampling repeats itself.
a = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0.9, seed=7).choices[0].message.content
b = client.chat.completions.create(model=model, messages=msgs, max_tokens=16, temperature=0.9, seed=7).choices[0].message.content
out["seeded_equal"] = a == b

errors = {}
try:
    openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
except openai.AuthenticationError as e:
    errors["wrong_key"] = e.status_code
try:
    client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=4)
except openai.NotFoundError as e:
    errors["unknown_model"] = e.status_code
try:
    client.completions.create(model=model, prompt="word " * 5000, max_tokens=4)
except openai.BadRequestError as e:
    errors["too_long"] = [e.status_code, e.message]
out["errors"] = errors
print(json.dumps(out))
