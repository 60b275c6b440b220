"""All three APIs at once on one account: what is billed is exactly what was delivered."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import openai
import pytest

from meters.tokens import get_tokenizer
from tests.conftest import RunningGateway

pytestmark = pytest.mark.timeout(60)

O200K = get_tokenizer("o200k_base")
ESTIMATE = get_tokenizer("estimate")
LONG = {"x-sim-output-tokens": "100000", "x-sim-tokens-per-chunk": "2"}


def test_three_dialects_concurrently_on_one_account(gw: RunningGateway) -> None:
    total = 1800
    account, key = gw.create_account(total)

    async def chat(client: openai.AsyncOpenAI) -> int:
        text = ""
        try:
            stream = await client.chat.completions.create(
                model="exact", messages=[{"role": "user", "content": "go"}], stream=True,
                max_tokens=100_000, extra_headers=LONG)
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
        return O200K.count(text)

    async def responses(client: openai.AsyncOpenAI) -> int:
        text = ""
        try:
            stream = await client.responses.create(model="resp-exact", input="go", stream=True,
                                                   extra_headers=LONG)
            async for event in stream:
                if event.type == "response.output_text.delta":
                    text += event.delta
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
        return O200K.count(text)

    async def messages(client: anthropic.AsyncAnthropic) -> int:
        counter = ESTIMATE.counter()
        counted = 0
        try:
            async with client.messages.stream(model="claude-exact", max_tokens=100_000,
                                              messages=[{"role": "user", "content": "go"}],
                                              extra_headers=LONG) as stream:
                async for event in stream:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        # Metered on the stream's running totals, delta by delta.
                        counted += counter.measure([event.delta.text])
                        counter.commit([event.delta.text])
        except anthropic.APIStatusError as exc:
            assert exc.status_code == 402
        return counted

    async def main() -> list[int]:
        async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0,
                                      timeout=30) as oai, anthropic.AsyncAnthropic(
                base_url=gw.url, api_key=key, max_retries=0, timeout=30) as ant:
            jobs: list[Any] = []
            for _ in range(6):
                jobs += [chat(oai), responses(oai), messages(ant)]
            return list(await asyncio.gather(*jobs))

    delivered = asyncio.run(main())
    state = gw.balance(account)
    # Billed exactly what was delivered, and all of the balance but what the Claude streams
    # could not use: a cut falls on a token boundary, and a simulator word costs up to 3
    # estimate tokens, so each of the 6 Claude streams can end with up to 2 units it held
    # but could not spend (returned to the balance once the other streams were already cut).
    assert state["held"] == "0" and state["spent"] == str(sum(delivered))
    assert 0 <= total - sum(delivered) <= 6 * 2
    assert int(state["balance"]) + int(state["spent"]) == total
